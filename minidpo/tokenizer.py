"""Text <-> token ids for a Hugging Face model folder or hub repo, and chat templates.

`load_tokenizer(path_or_repo_id)` reads what transformers reads:

* `tokenizer.json` (a `tokenizers` file) or, when there is none, `tokenizer.model` (SentencePiece,
  converted by `minidpo.spm`) plus `added_tokens.json` (e.g. OpenHermes' `<|im_end|>` = 32000);
* `tokenizer_config.json` and `special_tokens_map.json` for the bos/eos/unk/pad tokens,
  `add_bos_token`/`add_eos_token` and `added_tokens_decoder`;
* the Jinja chat template from `chat_template.jinja`, `chat_template.json` or
  `tokenizer_config.json["chat_template"]`, rendered in a sandbox as transformers does. A folder
  without one falls back to the built-in `chatml` template, with a warning; a caller pins a built-in
  template with `load_tokenizer(..., template="chatml")` or `tok.set_template("mistral")`.

A `.gguf` file carries its tokenizer in its metadata instead; `minidpo.gguf` rebuilds it.
"""
from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from minidpo import gguf, spm

# What a hub download fetches: the tokenizer and its chat template, never weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")

# ChatML (OpenHermes-2.5's own template): <|im_start|>role\ncontent<|im_end|>\n per message.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Mistral-instruct: <s>[INST] user [/INST]answer</s>[INST] user [/INST]... Mistral's v0.1 format has no
# system role; as in Mistral's later templates, a leading system message opens the first user turn.
# The prompt already ends where the answer starts, so add_generation_prompt adds nothing.
MISTRAL = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% if not messages %}{{ raise_exception('mistral template: a system message must be followed by a "
    "user message') }}{% endif %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('mistral template: after an optional system message, roles must alternate "
    "user/assistant/user/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' and loop.first and system %}"
    "{{ '[INST] ' + system + '\n\n' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}"
    "{{ message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

TEMPLATES = {"chatml": CHATML, "mistral": MISTRAL}
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_PROBE = "minidpo-end-of-turn-probe"  # assistant text whose successor token is the end-of-turn


# ---------------------------------------------------------------------------------------------------
# finding and reading the files

def resolve_folder(path_or_repo_id: str | Path) -> Path:
    """A local folder as is; anything shaped like `owner/name` that is not a folder, from the hub."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the folder that holds the tokenizer files")
    text = str(path_or_repo_id)
    if not re.fullmatch(r"[\w\-]+(\.[\w\-]+)*(/[\w\-.]+)?", text) or text.startswith((".", "~")):
        raise FileNotFoundError(f"no such folder: {path}")
    return _download(text)


def _download(repo_id: str) -> Path:
    """Fetch only the tokenizer files of a hub repo (or find them in the local cache)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(TOKENIZER_FILES)))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        hint = ""
        if constants.HF_HUB_OFFLINE:
            hint = (f" The hub is offline (HF_HUB_OFFLINE=1) and the files are not in the local cache "
                    f"({constants.HF_HUB_CACHE}).")
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder and its tokenizer files could not be fetched from the "
            f"Hugging Face Hub.{hint} ({type(e).__name__}: {e})") from e


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value, where: str) -> str | None:
    """Special tokens are written as "<s>" or as {"content": "<s>", ...} (a serialized AddedToken)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: expected a token string or {{'content': ...}}, got {value!r}")


def read_config(folder: Path) -> dict:
    """`tokenizer_config.json`, with special tokens it lacks taken from `special_tokens_map.json`."""
    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    for key in SPECIAL_KEYS:
        value = config[key] if config.get(key) is not None else special_map.get(key)
        config[key] = _token_text(value, f"{folder} ({key})")
    # transformers 4 writes a list under additional_special_tokens; 5 may write extra_special_tokens,
    # a list or a {name: token} dict
    extra = (config.get("additional_special_tokens") or special_map.get("additional_special_tokens")
             or config.get("extra_special_tokens") or [])
    extra = extra.values() if isinstance(extra, Mapping) else extra
    config["additional_special_tokens"] = [_token_text(t, f"{folder} (additional_special_tokens)")
                                           for t in extra]
    return config


def read_chat_template(folder: Path, config: dict) -> str | None:
    """The folder's own chat template (Jinja source), or None."""
    jinja_file, json_file = folder / "chat_template.jinja", folder / "chat_template.json"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    if json_file.is_file():
        return _pick_template(_read_json(json_file).get("chat_template"), json_file)
    if config.get("chat_template") is not None:
        return _pick_template(config["chat_template"], folder / "tokenizer_config.json")
    return None


def _pick_template(value, file: Path) -> str:
    """A template is a string, or a list of {"name", "template"} of which we use "default"."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(f"{file}: chat_template has no 'default' entry (names: {sorted(map(str, named))})")
    raise ValueError(f"{file}: chat_template must be a string, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------------
# building the `tokenizers` backend

def load_backend(folder: Path, config: dict) -> Backend:
    """`tokenizer.json` if present, else the converted `tokenizer.model`; post-processor per config."""
    json_file, spm_file = folder / "tokenizer.json", folder / "tokenizer.model"
    if json_file.is_file():
        try:
            backend = Backend.from_file(str(json_file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{json_file}: cannot load: {e}") from e
        # as transformers: explicit add_bos/eos_token flags, or a missing post-processor, decide
        if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
            _set_bos_eos(backend, config, default_bos=False, where=json_file)
    elif spm_file.is_file():
        model = spm.read_sentencepiece(spm_file)
        try:
            backend = spm.to_tokenizers(model)
        except ValueError as e:
            raise ValueError(f"{spm_file}: {e}") from e
        _fill_sentencepiece_specials(config, model)
        _add_tokens(backend, folder, config, base_size=len(model.pieces))
        _set_bos_eos(backend, config, default_bos=True, where=spm_file)  # Llama/Mistral add <s>
    else:
        raise FileNotFoundError(f"{folder}: no tokenizer found (looked for tokenizer.json and "
                                f"tokenizer.model)")
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
    return backend


def _fill_sentencepiece_specials(config: dict, model: spm.SentencePieceModel) -> None:
    """Special tokens the config does not name come from the SentencePiece trainer spec."""
    ids = {"bos_token": model.bos_id, "eos_token": model.eos_id, "unk_token": model.unk_id,
           "pad_token": model.pad_id}
    for key, index in ids.items():
        if config.get(key) is None:
            config[key] = model.piece_at(index)


def _set_bos_eos(backend: Backend, config: dict, *, default_bos: bool, where: Path) -> None:
    bos = config["bos_token"] if config.get("add_bos_token", default_bos) else None
    eos = config["eos_token"] if config.get("add_eos_token", False) else None
    try:
        backend.post_processor = spm.bos_eos_processor(backend, bos, eos)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def _collect_added(folder: Path, config: dict) -> dict[int, dict]:
    """id -> AddedToken fields, from `added_tokens.json` ({content: id}) and `added_tokens_decoder`."""
    added_file = folder / "added_tokens.json"
    found = {}
    for content, index in _read_json(added_file).items():
        if not isinstance(index, int):
            raise ValueError(f"{added_file}: id of {content!r} must be an integer, got {index!r}")
        found[index] = {"content": content}
    for key, fields in (config.get("added_tokens_decoder") or {}).items():
        if not (str(key).isdigit() and isinstance(fields, Mapping) and "content" in fields):
            raise ValueError(f"{folder / 'tokenizer_config.json'}: bad added_tokens_decoder entry {key!r}")
        found[int(key)] = {**found.get(int(key), {}), **fields}
    return found


def _add_tokens(backend: Backend, folder: Path, config: dict, *, base_size: int) -> None:
    """Add the folder's added tokens at their ids; ids past the model must follow it without gaps."""
    specials = {config.get(k) for k in SPECIAL_KEYS} | set(config["additional_special_tokens"])
    for index, fields in sorted(_collect_added(folder, config).items()):
        content = fields["content"]
        if index < base_size and backend.id_to_token(index) != content:
            raise ValueError(f"{folder}: added token {content!r} has id {index}, but that id holds "
                             f"{backend.id_to_token(index)!r} in tokenizer.model")
        free = backend.get_vocab_size(with_added_tokens=True)
        if index >= base_size and index != free:
            raise ValueError(f"{folder}: added token {content!r} has id {index}, but the next free id "
                             f"is {free}: added ids must follow the model's without gaps")
        # never normalized: SentencePiece text gets a "▁" prepended per span, which would hide them
        token = AddedToken(content, lstrip=bool(fields.get("lstrip", False)),
                           rstrip=bool(fields.get("rstrip", False)),
                           single_word=bool(fields.get("single_word", False)), normalized=False,
                           special=bool(fields.get("special", content in specials)))
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(content) != index:
            raise ValueError(f"{folder}: added token {content!r} landed at id "
                             f"{backend.token_to_id(content)}, expected {index}")


# ---------------------------------------------------------------------------------------------------
# chat templates

def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: jinja's own tojson escapes HTML characters, which templates do not expect
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=1)
def _jinja_env() -> ImmutableSandboxedEnvironment:
    """Templates come from downloaded files: render them sandboxed, with transformers' settings."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def compile_template(source: str, name: str) -> jinja2.Template:
    """Compile a chat template; `name` says where it came from in errors."""
    try:
        return _jinja_env().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template {name} is not valid Jinja (line {e.lineno}): {e.message}") from e


def _check_template_name(name: str) -> None:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known templates: {', '.join(sorted(TEMPLATES))}")


def check_messages(messages) -> list[dict]:
    """Messages are a list of {"role": str, "content": str}; errors name the message's index."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, "
                         f"got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', "
                             f"got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"message {i} has no {key!r}: {dict(message)!r}")
            if not isinstance(message[key], str):
                raise ValueError(f"message {i}: {key!r} must be a string, got {type(message[key]).__name__}")
    return [dict(m) for m in messages]


# ---------------------------------------------------------------------------------------------------

class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template of a model folder.

    Attributes: `bos_id`, `eos_id`, `unk_id`, `pad_id` (int or None); `pad_id` falls back to the unk
    token, then eos, when the folder names no pad token (unk rather than eos so that masking pads
    never masks a real end-of-sequence); `eot_id` (end of an assistant turn under the chat
    template: `<|im_end|>` for ChatML, eos for `[INST]`); `stop_ids` (eos and eot, a tuple);
    `vocab_size` (including added tokens); `template_name` ("chatml", "mistral", or "model" for the
    folder's own template) and `chat_template` (its Jinja source).
    """

    def __init__(self, backend: Backend, config: dict, *, name_or_path: str = "",
                 chat_template: str | None = None, template_name: str = "model"):
        self.backend = backend
        self.name_or_path = name_or_path
        self.special_tokens = {k: config.get(k) for k in SPECIAL_KEYS if config.get(k) is not None}
        for key in SPECIAL_KEYS:
            setattr(self, key, self.special_tokens.get(key))
            token = self.special_tokens.get(key)
            index = None if token is None else backend.token_to_id(token)
            if token is not None and index is None:
                raise ValueError(f"{name_or_path}: {key} {token!r} is not in the vocabulary")
            setattr(self, key.replace("_token", "_id"), index)
        if self.pad_id is None:
            self.pad_id = self.unk_id if self.unk_id is not None else self.eos_id
            self.pad_token = None if self.pad_id is None else backend.id_to_token(self.pad_id)
        self._added = backend.get_added_tokens_decoder()  # id -> AddedToken
        # the config asks for bos (add_bos_token, or tokenizer.json's post-processor): see apply_chat_template
        self.adds_bos = self.bos_id is not None and backend.encode("").ids[:1] == [self.bos_id]
        if chat_template is None:
            self.set_template(template_name)
        else:
            self._use_template(chat_template, template_name)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding must have at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: end-of-sequence and the template's end-of-turn, deduplicated."""
        return tuple(dict.fromkeys(i for i in (self.eos_id, self.eot_id) if i is not None))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self.backend.id_to_token(index)

    def encode(self, text: str, add_special_tokens: bool = True, *,
               split_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, the model's bos/eos as its config says.

        Special tokens written in the text ("</s>", "<|im_end|>") become their ids, as in
        transformers; `split_special_tokens=True` encodes them as plain text instead (for untrusted
        text that must not inject control tokens).
        """
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        default = self.backend.encode_special_tokens
        self.backend.encode_special_tokens = split_special_tokens or default
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        finally:
            self.backend.encode_special_tokens = default

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list of ints or a 1-D tensor)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def set_template(self, name: str) -> None:
        """Pin a built-in chat template by name (see `TEMPLATES`)."""
        _check_template_name(name)
        self._use_template(TEMPLATES[name], name)
        if name == "chatml":
            missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in self.backend.get_vocab()]
            if missing:
                warnings.warn(f"{self.name_or_path}: chat template 'chatml' uses {missing}, which are not "
                              f"tokens of this vocabulary; they will be spelled out in pieces", stacklevel=2)

    def _use_template(self, source: str, name: str) -> None:
        self._template = compile_template(source, f"{name!r} of {self.name_or_path}")
        self.chat_template, self.template_name = source, name
        self.eot_id = self._end_of_turn_id()

    def _end_of_turn_id(self) -> int | None:
        """The added token right after an assistant's text under the template, else eos."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
        try:
            text = self._render(probe, add_generation_prompt=False)
        except ValueError:
            return self.eos_id  # a template that rejects the probe conversation: no better guess
        after = text.split(_PROBE, 1)[1].lstrip() if _PROBE in text else ""
        # the longest added token the text continues with ("<|im_end|>", "</s>", "<|eot_id|>", ...)
        hits = [(len(t.content), i) for i, t in self._added.items() if after.startswith(t.content)]
        return max(hits)[1] if hits else self.eos_id

    def _render(self, messages: list[dict], add_generation_prompt: bool, **extra) -> str:
        variables = {**self.special_tokens, **extra}
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **variables)
        except (jinja2.TemplateError, TypeError) as e:  # TypeError: e.g. a str + int inside the template
            raise ValueError(f"chat template {self.template_name!r} failed: {e}") from e

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False,
                            **template_variables):
        """Render `messages` ([{"role", "content"}, ...]) with the chat template, as transformers does.

        Returns the string, or with `tokenize=True` its ids. The BOS rule: the ids start with bos
        when the template writes it (Llama 3, Mistral) or when the tokenizer's config adds it
        (`add_bos_token`, as OpenHermes-2.5's ChatML template and its Mistral base were trained);
        never twice, and no eos is added. Training (`minidpo.data`) and generation share this.
        transformers' `apply_chat_template(tokenize=True)` never adds bos; its `tokenizer(text)`
        does. Extra keyword arguments become template variables.
        """
        text = self._render(check_messages(messages), add_generation_prompt, **template_variables)
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return [self.bos_id] + ids if self.adds_bos and ids[:1] != [self.bos_id] else ids

    def save(self, directory) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` (special tokens, chat template): a folder
        that `load_tokenizer` and transformers read back as this tokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {**self.special_tokens, "chat_template": self.chat_template,
                  "tokenizer_class": "PreTrainedTokenizerFast"}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        return directory

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id}, eot_id={self.eot_id}, "
                f"template={self.template_name!r})")


def load_tokenizer(path_or_repo_id: str | Path, *, template: str | None = None) -> Tokenizer:
    """Load the tokenizer of a Hugging Face model folder, hub repo id (tokenizer files only) or `.gguf`
    file (its `tokenizer.ggml.*` metadata and `tokenizer.chat_template`).

    `template` pins a built-in chat template ("chatml", "mistral"); by default the folder's own is
    used, or `chatml` with a warning when it has none.
    """
    if template is not None:
        _check_template_name(template)
    name = str(path_or_repo_id)
    if gguf.is_gguf(path_or_repo_id):
        backend, config, found = gguf.tokenizer_parts(path_or_repo_id)
        _set_bos_eos(backend, config, default_bos=False, where=Path(name))
        where = f"{name} (tokenizer.chat_template)"
    else:
        folder = resolve_folder(path_or_repo_id)
        config = read_config(folder)
        backend = load_backend(folder, config)
        found = read_chat_template(folder, config) if template is None else None
        where = f"{folder} (looked in chat_template.jinja, chat_template.json and tokenizer_config.json)"
    if template is not None:
        return Tokenizer(backend, config, name_or_path=name, template_name=template)
    if found is None:
        warnings.warn(f"{where}: no chat template; using the built-in 'chatml' template", stacklevel=2)
        return Tokenizer(backend, config, name_or_path=name, template_name="chatml")
    return Tokenizer(backend, config, name_or_path=name, chat_template=found, template_name="model")
