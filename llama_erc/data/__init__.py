"""The data wing: the road from a `KIND=PATH` spec to training Sequences and the example sets eval scores.

    dialogues = load_dialogues("meld", "../shared/data/meld", "train")        # corpora.py: the dataset registry
    dialogues = attach_knowledge(dialogues, "knowledge.csv", "meld")          # optional, knowledge.py
    examples = build_examples(dialogues, "meld", PromptConfig(context_turns=2))   # prompts.py
    codec = build_codec(load_tokenizer("tokenizer.model"), "alpaca")       # tokenizers/, codec.py
    ids, labels = encode_example(codec, examples[0], max_len=512)             # encode.py
    seqs, fingerprints = training_data(DataConfig(train_data=("meld=...",)), codec, seed=0)   # sets.py

A new corpus is one reader module and one row of data/corpora.py; a new data lever is one DataConfig field and
its builder (sets.py, prompts.py). Imports nothing of ours outside `data` (STYLE.md §2), and no torch.
"""
from llama_erc.data.codec import PROMPT_FORMATS, PromptCodec, build_codec
from llama_erc.data.corpora import (CORPORA, DATA_KINDS, ERC_KINDS, LABELS, PROMPTS_KIND, Corpus, corpus,
                                    load_dialogues)
from llama_erc.data.emorynlp import EMORYNLP_LABELS, read_emorynlp_csv, read_emorynlp_json
from llama_erc.data.encode import (IGNORE_INDEX, encode_example, encode_prompt, encode_response,
                                   load_prompt_response_jsonl)
from llama_erc.data.iemocap import IEMOCAP_ALL_LABELS, IEMOCAP_DEV_EVERY, IEMOCAP_LABELS, read_iemocap
from llama_erc.data.jsonl import read_jsonl_dialogues
from llama_erc.data.knowledge import attach_knowledge, read_knowledge
from llama_erc.data.leaks import LeakGuard, LeakReport, leak_key
from llama_erc.data.meld import MELD_LABELS, read_meld_csv
from llama_erc.data.prompts import (Example, PromptConfig, PromptParts, build_examples, build_impact_examples,
                                    build_speaker_examples, draw_demonstrations, label_words, render_prompt,
                                    with_context)
from llama_erc.data.retrieval import nearest_train_utterances
from llama_erc.data.schema import SPLITS, DataError, Dialogue, Utterance, dialogue_labels, normalize_text
from llama_erc.data.sets import (DataConfig, ExampleSet, Sequence, dev_sets, encode_sequences, fingerprint,
                                 load_example_set, mix_examples, parse_spec, training_data)
from llama_erc.data.tokenizers import (PAD_FALLBACK_ID, SentencePieceTokenizer, Tokenizer, find_tokenizer,
                                       load_tokenizer, train_tokenizer)

__all__ = [
    "PROMPT_FORMATS", "PromptCodec", "build_codec",
    "CORPORA", "DATA_KINDS", "ERC_KINDS", "LABELS", "PROMPTS_KIND", "Corpus", "corpus", "load_dialogues",
    "EMORYNLP_LABELS", "read_emorynlp_csv", "read_emorynlp_json",
    "IGNORE_INDEX", "encode_example", "encode_prompt", "encode_response", "load_prompt_response_jsonl",
    "IEMOCAP_ALL_LABELS", "IEMOCAP_DEV_EVERY", "IEMOCAP_LABELS", "read_iemocap", "read_jsonl_dialogues",
    "attach_knowledge", "read_knowledge", "LeakGuard", "LeakReport", "leak_key", "MELD_LABELS", "read_meld_csv",
    "Example", "PromptConfig", "PromptParts", "build_examples", "build_impact_examples", "build_speaker_examples",
    "draw_demonstrations", "label_words", "render_prompt", "with_context", "nearest_train_utterances",
    "SPLITS", "DataError", "Dialogue", "Utterance", "dialogue_labels", "normalize_text",
    "DataConfig", "ExampleSet", "Sequence", "dev_sets", "encode_sequences", "fingerprint", "load_example_set",
    "mix_examples", "parse_spec", "training_data",
    "PAD_FALLBACK_ID", "SentencePieceTokenizer", "Tokenizer", "find_tokenizer", "load_tokenizer", "train_tokenizer",
]
