"""ERC data pipeline: corpora -> Dialogue -> Example (prompt, response) -> token ids -> padded batches.

    dialogues = load_dialogues("meld", "../shared/data/meld", "train")        # data/erc.py
    dialogues = attach_knowledge(dialogues, "knowledge.csv", "meld")          # optional, data/knowledge.py
    examples = build_examples(dialogues, "meld", PromptConfig(context_turns=2))   # data/prompts.py
    tok = load_tokenizer("tokenizer.model")   # or tokenizer.json, a .gguf, a checkpoint dir; data/tokenizer.py
    batch = pad_batch([encode_example(tok, e, max_len=512) for e in examples[:8]], tok.pad_id)  # collate.py

Imports nothing of ours outside `data` (STYLE.md §2).
"""
from data.collate import (IGNORE_INDEX, encode_example, encode_prompt, encode_response,
                          load_prompt_response_jsonl, pad_batch)
from data.emorynlp import read_emorynlp_csv, read_emorynlp_json
from data.erc import KINDS, load_dialogues, read_jsonl_dialogues
from data.iemocap import IEMOCAP_ALL_LABELS, IEMOCAP_DEV_EVERY, read_iemocap
from data.knowledge import attach_knowledge, read_knowledge
from data.meld import read_meld_csv
from data.prompt_format import PROMPT_FORMATS, PromptCodec, build_codec
from data.prompts import (DATASET_NAMES, DEFAULT_LABEL_WORDS, Example, PromptConfig, PromptParts,
                          build_examples, build_impact_examples, draw_demonstrations, label_words, mix_examples,
                          render_prompt, with_context)
from data.retrieval import nearest_train_utterances
from data.schema import (EMORYNLP_LABELS, IEMOCAP_LABELS, LABELS, MELD_LABELS, SPLITS, DataError, Dialogue,
                         Utterance, dialogue_labels, normalize_text)
from data.tokenizer import PAD_FALLBACK_ID, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "PROMPT_FORMATS", "PromptCodec", "build_codec",
    "IGNORE_INDEX", "encode_example", "encode_prompt", "encode_response", "load_prompt_response_jsonl",
    "pad_batch", "KINDS", "load_dialogues", "read_jsonl_dialogues", "read_emorynlp_csv", "read_emorynlp_json",
    "IEMOCAP_ALL_LABELS", "IEMOCAP_DEV_EVERY", "read_iemocap", "attach_knowledge", "read_knowledge",
    "read_meld_csv", "DATASET_NAMES", "DEFAULT_LABEL_WORDS", "Example", "PromptConfig", "PromptParts",
    "build_examples", "build_impact_examples", "draw_demonstrations", "label_words", "mix_examples",
    "render_prompt", "with_context", "nearest_train_utterances",
    "EMORYNLP_LABELS", "IEMOCAP_LABELS", "LABELS", "MELD_LABELS", "SPLITS", "DataError", "Dialogue",
    "Utterance", "dialogue_labels", "normalize_text", "PAD_FALLBACK_ID", "Tokenizer", "load_tokenizer",
    "train_tokenizer",
]
