"""Prompt text -> token ids in one of two layouts: DialogueLLM's `alpaca` (the default) or the model's own `chat`.

    alpaca:  [BOS] ids("### Instruction: ... ### Response:")            | ids(" " + word) [EOS]
    chat:    ids(template before the user message) ids(prompt without the "### Response:" cue)
             ids(template after it, through the assistant header)      | ids(word) [end of turn]

`|` is the prompt/response boundary: the response is encoded on its own (training supervises it, decoding scores
each label word there), and prompt ids + response ids equal the ids of the joined text on every tokenizer
backend (tests/data/test_codec.py). alpaca joins with a space: a SentencePiece model's dummy prefix
supplies it (LLaMA 2), byte-level BPE encodes it as the word's leading "Ġ" (SmolLM2, Llama 3).

chat renders the tokenizer's own Jinja chat template (GGUF `tokenizer.chat_template`, HF tokenizer_config.json or
chat_template.jinja; a Meta Llama 3 tiktoken model gets Llama 3's header-token layout) once, around a sentinel
user message, and splits it there: the scaffolding (`<|im_start|>user\\n`, `<|start_header_id|>...`) is encoded
with control tokens, the user message itself as plain text, so a "<|im_end|>" inside an utterance stays text.
The answer ends with the template's own end-of-turn token (the first control token the template writes after
an assistant message: `<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3), else the tokenizer's EOS.
BOS: alpaca adds it when the model's convention does (`tok.add_bos`); chat takes what the template writes.
"""
from __future__ import annotations

from dataclasses import dataclass

from llama_erc.data.tokenizers.base import Tokenizer

PROMPT_FORMATS = ("alpaca", "chat")
RESPONSE_CUE = "\n\n### Response:"   # how data/prompts.py ends every prompt; chat drops it (the assistant turn is the cue)
_USER, _ANSWER = "\x00USER\x00", "\x00ANSWER\x00"   # sentinels no template or utterance contains
# Llama 3's header-token layout, for Meta's tiktoken tokenizer.model, which ships no Jinja template
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@dataclass(frozen=True)
class PromptCodec:
    """Token ids of prompts and responses for one tokenizer and prompt format (see the module docstring)."""
    tok: Tokenizer                   # a data.load_tokenizer backend
    prompt_format: str = "alpaca"
    before_user: tuple[int, ...] = ()   # chat: template ids before the user message
    after_user: tuple[int, ...] = ()    # chat: template ids after it, through the assistant header
    end_id: int = -1                    # the answer's last token

    @property
    def pad_id(self) -> int:
        return self.tok.pad_id

    @property
    def vocab_size(self) -> int:
        return self.tok.vocab_size

    def prompt_ids(self, prompt: str) -> list[int]:
        if self.prompt_format == "alpaca":
            return self.tok.encode(prompt, bos=True)
        body = prompt[:-len(RESPONSE_CUE)] if prompt.endswith(RESPONSE_CUE) else prompt
        return list(self.before_user) + self.tok.encode(body) + list(self.after_user)

    def response_ids(self, response: str) -> list[int]:
        """The label word's ids and the end token (EOS or end of turn), as the boundary contract needs."""
        if self.prompt_format == "alpaca" and not getattr(self.tok, "dummy_prefix", True):
            response = " " + response   # byte-level BPE: the separating space belongs to the word's first token
        return self.tok.encode(response) + [self.end_id]


def build_codec(tok: Tokenizer, prompt_format: str = "alpaca") -> PromptCodec:
    """The codec for `tok` in `prompt_format`; chat needs a chat template (or Llama 3's header tokens)."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"--prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    if prompt_format == "alpaca":
        return PromptCodec(tok, "alpaca", end_id=tok.eos_id)
    template = getattr(tok, "chat_template", None)
    specials = getattr(tok, "special_tokens", {}) or {}
    if not template and "<|start_header_id|>" in specials:
        template = LLAMA3_TEMPLATE
    if not template:
        raise ValueError(f"--prompt_format chat: the tokenizer {getattr(tok, 'path', tok)} has no chat template "
                         "(GGUF tokenizer.chat_template, tokenizer_config.json chat_template, chat_template.jinja); "
                         "use --prompt_format alpaca")
    ask = render_chat(template, tok, [{"role": "user", "content": _USER}], add_generation_prompt=True)
    if ask.count(_USER) != 1:
        raise ValueError(f"--prompt_format chat: the chat template of {getattr(tok, 'path', tok)} does not write "
                         "the user message exactly once")
    before, after = ask.split(_USER)
    answered = render_chat(template, tok, [{"role": "user", "content": _USER}, {"role": "assistant", "content": _ANSWER}],
                           add_generation_prompt=False)
    end_id = tok.eos_id
    if answered.count(_ANSWER) == 1:
        special_ids = set(specials.values())
        end_id = next((i for i in tok.encode_special(answered.split(_ANSWER)[1]) if i in special_ids), tok.eos_id)
    return PromptCodec(tok, "chat", tuple(tok.encode_special(before)), tuple(tok.encode_special(after)), end_id)


def render_chat(template: str, tok, messages: list[dict], add_generation_prompt: bool) -> str:
    """A chat template rendered with jinja2 (a dependency of torch) in a sandbox, as transformers renders it."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError("--prompt_format chat renders the model's Jinja chat template and needs the 'jinja2' "
                         "package (installed with torch)") from None

    def raise_exception(message: str):
        raise ValueError(f"chat template: {message}")

    # transformers' settings (trim_blocks, lstrip_blocks, loop controls), so the text is the one it renders
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    specials = {i: s for s, i in (getattr(tok, "special_tokens", {}) or {}).items()}
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=specials.get(tok.bos_id, ""),
                                                eos_token=specials.get(tok.eos_id, ""))
    except Exception as e:  # a template error: name it rather than show Jinja's traceback
        raise ValueError(f"--prompt_format chat: cannot render the chat template of "
                         f"{getattr(tok, 'path', tok)}: {e}") from None
