"""Chat templates: the model folder's Jinja template (`chat_template.jinja`, or `chat_template` in
`tokenizer_config.json`), rendered as Hugging Face's tokenizers render it: a sandboxed environment,
`raise_exception`, `bos_token`, `eos_token`, `add_generation_prompt`, and a `tojson` that keeps
non-ASCII text."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from metalforge.errors import MetalforgeError


class ChatTemplateError(MetalforgeError):
    """The template refused the messages (its raise_exception, or an error while rendering)."""


def _special(config: dict, name: str) -> str:
    value = config.get(name) or ""
    return value.get("content", "") if isinstance(value, dict) else value


def _raise(message):
    raise ChatTemplateError(message)


class ChatTemplate:
    def __init__(self, source: str, where: str, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise MetalforgeError(f"{where}: the chat template does not parse ({e})") from None
        self.where, self.bos_token, self.eos_token = where, bos_token, eos_token

    def render(self, messages: list[dict]) -> str:
        """The prompt for `messages` (dicts of role and content), ending with the assistant's turn."""
        try:
            # tools and documents are passed as None, as Hugging Face passes them: templates test them
            return self.template.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except Exception as e:   # a template is a program: any error in it is about these messages
            raise ChatTemplateError(f"the chat template cannot render these messages "
                                    f"({type(e).__name__}: {e})") from None


def load(folder, override=None) -> ChatTemplate:
    """The template of a model folder, or of the file `override`. A folder without one is an error
    naming where a template is looked for."""
    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MetalforgeError(f"{config_path}: not valid JSON ({e})") from None
    specials = dict(bos_token=_special(config, "bos_token"), eos_token=_special(config, "eos_token"))
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise MetalforgeError(f"--chat-template {path}: no such file")
        return ChatTemplate(path.read_text(), str(path), **specials)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return ChatTemplate(jinja.read_text(), str(jinja), **specials)
    source = config.get("chat_template")
    if isinstance(source, list):   # named templates: the default one
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if isinstance(source, str) and source:
        return ChatTemplate(source, str(config_path), **specials)
    raise MetalforgeError(f"{folder} has no chat template (looked for chat_template.jinja and 'chat_template' in "
                          "tokenizer_config.json); pass one with --chat-template FILE, or use /v1/completions")
