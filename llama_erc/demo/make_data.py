"""Write the bundled demo ERC dataset: llama_erc/demo/meld_format/{train,dev,test}_sent_emo.csv.

Every sentence is synthetic, filled in from the templates below (written for this project), in MELD's exact
CSV format (Sr No., Utterance, Speaker, Emotion, Sentiment, Dialogue_ID, Utterance_ID, Season, Episode,
StartTime, EndTime) so the MELD reader and the whole pipeline run on it. The wording correlates with the
emotion so a tiny model can learn it, with noise: 10% of labels are swapped for another emotion, and a turn
repeats the previous turn's emotion 30% of the time (context helps). All 7 MELD labels occur in every
split, neutral is the majority. Like MELD: a few dialogues skip an Utterance_ID, some apostrophes are
typographic (’), times look like "00:01:02,345".

Deterministic for a given seed:  python -m llama_erc.demo.make_data [--out DIR] [--seed 0]
"""
from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

LABELS = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")
WEIGHTS = {"neutral": 0.50, "joy": 0.15, "surprise": 0.10, "anger": 0.08, "sadness": 0.07, "fear": 0.05,
           "disgust": 0.05}
N_DIALOGUES = {"train": 90, "dev": 20, "test": 20}
MIN_TURNS, MAX_TURNS = 3, 8
P_NOISE, P_PERSIST, P_GAP, P_CURLY = 0.10, 0.30, 0.015, 0.3
HEADER = ("Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "Season",
          "Episode", "StartTime", "EndTime")

SPEAKERS = ("Avery", "Blake", "Casey", "Devon", "Emery", "Harper", "Jordan", "Quinn", "Rowan", "Sage")
THINGS = ("bike", "laptop", "guitar", "sandwich", "umbrella", "camera", "plant", "jacket", "ticket", "couch")
PLACES = ("kitchen", "office", "garage", "park", "station", "library", "basement", "cafe", "attic", "lobby")
TEMPLATES = {
    "neutral": ("I put the {thing} in the {place}.", "{name} said the meeting moved to Tuesday.",
                "Can you hand me the {thing}?", "The bus to the {place} leaves at six.",
                "I think the {thing} is still in the {place}.", "We should check the schedule first.",
                "Okay, I'll call {name} later.", "It's on the second shelf in the {place}.",
                "Did you remember to buy milk?", "Let's meet at the {place} around noon."),
    "joy": ("This is wonderful, I love the new {thing}!", "We won! I'm so happy right now!",
            "Thank you so much, {name}, this made my day!", "Haha, that's the best news I've heard all week!",
            "I'm thrilled, the {place} looks amazing!", "Yes! I finally fixed the {thing}, I'm so proud!",
            "What a lovely surprise party, I'm delighted!", "I got the job! Best day ever!"),
    "surprise": ("Wait, what? You sold the {thing}?!", "No way! {name} is here?!",
                 "Whoa, I did not expect that at all!", "Really? The {place} is closed?!",
                 "Are you serious? Since when?!", "Oh my, you bought a {thing}?!",
                 "Huh? How did you get into the {place}?!", "Seriously? That happened today?!"),
    "fear": ("I heard a strange noise in the {place}, I'm scared.", "Please don't leave me alone here, I'm terrified.",
             "What if {name} finds out? I'm so nervous.", "Something is moving in the {place}, I'm afraid.",
             "I'm frightened, the lights in the {place} just went out.", "My hands are shaking, I can't do this."),
    "sadness": ("I miss {name} so much, everything feels empty.", "I lost my {thing} and I just feel miserable.",
                "Nobody came to the {place}, I'm so lonely.", "I'm sorry, I can't stop crying today.",
                "It's over between us, I'm heartbroken.", "I feel so down since {name} moved away."),
    "disgust": ("Ugh, there's something rotten in the {place}, gross!", "Eww, did you lick the {thing}? Disgusting!",
                "That smell in the {place} is revolting.", "Yuck, I can't believe you ate that.",
                "Gross, the {thing} is covered in slime.", "Ew, {name} left old socks on the {thing}."),
    "anger": ("You broke my {thing} again? I'm furious!", "Get out of the {place} right now!",
              "I told you a hundred times, stop lying to me!", "This is unacceptable, {name}, I'm so angry!",
              "Don't you dare touch my {thing} ever again!", "Why would you do that? I'm sick of this!"),
}


def _sentiment(emotion: str, rng: random.Random) -> str:
    if emotion == "neutral":
        return "neutral"
    if emotion == "surprise":   # MELD's surprise is positive or negative
        return rng.choice(("positive", "negative"))
    return "positive" if emotion == "joy" else "negative"


def _time(ms: int) -> str:
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def _turn(rng: random.Random, emotion: str, speakers: list[str]) -> str:
    text = rng.choice(TEMPLATES[emotion]).format(thing=rng.choice(THINGS), place=rng.choice(PLACES),
                                                 name=rng.choice(speakers))
    return text.replace("'", "\u2019") if rng.random() < P_CURLY else text


def make_split(rng: random.Random, n_dialogues: int) -> list[tuple]:
    """Rows (without Sr No.) of one split."""
    rows, emotions = [], list(WEIGHTS)
    weights = [WEIGHTS[e] for e in emotions]
    for dialogue_id in range(n_dialogues):
        cast = rng.sample(SPEAKERS, rng.randint(2, 3))
        season, episode, clock = rng.randint(1, 10), rng.randint(1, 24), rng.randint(0, 1_200_000)
        utterance_id, previous = 0, None
        for _ in range(rng.randint(MIN_TURNS, MAX_TURNS)):
            shown = previous if previous and rng.random() < P_PERSIST else rng.choices(emotions, weights)[0]
            text = _turn(rng, shown, cast)
            label = rng.choice([e for e in LABELS if e != shown]) if rng.random() < P_NOISE else shown
            start, clock = clock, clock + rng.randint(900, 4000)
            rows.append((text, rng.choice(cast), label, _sentiment(label, rng), dialogue_id, utterance_id,
                         season, episode, _time(start), _time(clock)))
            utterance_id += 2 if rng.random() < P_GAP else 1
            clock += rng.randint(100, 800)
            previous = shown
    return rows


def write_demo(out_dir: str | Path, seed: int = 0) -> dict[str, int]:
    """Write the three CSVs; returns {split: number of utterances}."""
    rng = random.Random(seed)
    splits = {}
    for split, n_dialogues in N_DIALOGUES.items():
        for _ in range(100):   # redraw (deterministically) until every label occurs in the split
            rows = make_split(rng, n_dialogues)
            if set(LABELS) <= {r[2] for r in rows}:
                break
        else:
            raise RuntimeError(f"seed {seed}: could not draw a {split} split with all 7 labels")
        splits[split] = rows
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(out_dir / f"{split}_sent_emo.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\r\n")   # MELD's files use CRLF
            writer.writerow(HEADER)
            writer.writerows((i, *row) for i, row in enumerate(rows, start=1))
    return {split: len(rows) for split, rows in splits.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "meld_format"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = write_demo(args.out, args.seed)
    print(" ".join(f"{split} {n}" for split, n in counts.items()), "utterances ->", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
