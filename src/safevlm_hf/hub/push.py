"""Push a saved SafeVLM checkpoint folder to the Hugging Face Hub: exactly the files a remote-code load needs, in one
commit.

The folder is what `model.save_pretrained(d)` + `processor.save_pretrained(d)` write: safetensors weights, configs,
the `*_safevlm.py` code files named by the `auto_map`s (and their relative imports), the processor, tokenizer and chat
template, and the model card. Anything else in the folder (optimizer states, pickled `training_args.bin`, notes,
sub-folders) is left out, with a warning that names it.

The folder may have been prepared by someone else, so only regular files inside it are uploaded: a name that points
outside it (an absolute or `..` path in the weight index's `weight_map`, an `auto_map` module that is not a sibling
file), a symbolic link anywhere on a file's path (e.g. a symlinked `tokenizer.json`) and anything that is not a
regular file (a FIFO, a device, a folder where a file is expected) are refused with an error that names the entry.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi
from transformers.dynamic_module_utils import get_relative_imports
from transformers.utils import (
    CHAT_TEMPLATE_DIR,
    CHAT_TEMPLATE_FILE,
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    IMAGE_PROCESSOR_NAME,
    LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE,
    PROCESSOR_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    logging,
)

from .model_card import MODEL_CARD_NAME, fill_model_card_repo_id


logger = logging.get_logger(__name__)

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
# Files a tokenizer may be saved as; at least one vocabulary file must be there.
TOKENIZER_VOCAB_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
)
TOKENIZER_EXTRA_FILES: tuple[str, ...] = ("special_tokens_map.json", "added_tokens.json", "merges.txt")
PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# The config files whose `auto_map` names the code files a `trust_remote_code` load imports.
AUTO_MAP_FILES: tuple[str, ...] = (CONFIG_NAME, PROCESSOR_NAME, TOKENIZER_CONFIG_NAME, IMAGE_PROCESSOR_NAME)


class CheckpointFolderError(ValueError):
    """A checkpoint folder lacks files a remote-code load needs, or holds files that must not be uploaded."""


_ABSENT = "absent"  # what _Folder._refusal returns when nothing is at the path
_FILE_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


class _Folder:
    """The checkpoint folder as the upload sees it: only regular files inside it exist.

    Every name the plan touches goes through :meth:`status` before it is read or listed: a path that leaves the
    folder, a symbolic link on the way (checked component by component, without following it) or a special file is
    recorded as a problem naming the entry and is neither read nor uploaded.
    """

    def __init__(self, root: Path):
        self.root = root
        self.files: list[str] = []
        self.missing: list[str] = []
        self.problems: list[str] = []
        self._refused: set[str] = set()
        # name -> its refusal: a name is checked once per plan, however often it is asked about (a weight index
        # names the same few shards for thousands of tensors).
        self._checked: dict[str, str | None] = {}

    def _refusal(self, name: str) -> str | None:
        """Why `name` is not a regular file inside the folder, `_ABSENT` if nothing is there, `None` if it is one."""
        if name not in self._checked:
            self._checked[name] = self._check(name)
        return self._checked[name]

    def _check(self, name: str) -> str | None:
        """:meth:`_refusal` without the memo: looks at the file system, one component of `name` at a time."""
        if not name or "\\" in name or PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            return "is not a path inside the folder (absolute, or with '..')"
        current = self.root
        for part in PurePosixPath(name).parts:
            current = current / part
            try:
                mode = os.lstat(current).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return _ABSENT
            if stat.S_ISLNK(mode):
                where = "" if current == self.root / name else f" ({current.relative_to(self.root).as_posix()})"
                return f"is reached through a symbolic link{where} to {os.readlink(current)!r}"
        if not stat.S_ISREG(mode):
            return f"is not a regular file ({_FILE_KINDS.get(stat.S_IFMT(mode), 'special file')})"
        return None

    def status(self, name: str, entry: str | None = None) -> str:
        """`"file"`, `"absent"` or `"refused"` (the refusal is recorded once, naming `entry` or else `name`)."""
        refusal = self._refusal(name)
        if refusal is None:
            return "file"
        if refusal == _ABSENT:
            return "absent"
        label = entry or name
        if label not in self._refused:
            self._refused.add(label)
            self.problems.append(f"{label}: {name!r} {refusal}; only regular files inside the folder are uploaded.")
        return "refused"

    def has(self, name: str) -> bool:
        return self.status(name) == "file"

    def need(self, name: str, why: str) -> None:
        status = self.status(name)
        if status == "file":
            self.files.append(name)
        elif status == "absent":
            self.missing.append(f"{name} ({why})")

    def take_if_present(self, name: str) -> None:
        if self.has(name):
            self.files.append(name)

    def read_json(self, name: str) -> dict[str, Any]:
        """A JSON object file of the folder (only call after :meth:`has` said it is a regular file)."""
        path = self.root / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as err:
            raise CheckpointFolderError(f"{path}: cannot be read as JSON ({err or type(err).__name__}).") from None
        if not isinstance(data, dict):
            raise CheckpointFolderError(f"{path}: expected a JSON object, got {type(data).__name__}.")
        return data


def _auto_map_modules(folder: _Folder) -> list[str]:
    """Module names (`modeling_safevlm`, ...) that the folder's `auto_map` entries point to."""
    modules: list[str] = []
    for name in AUTO_MAP_FILES:
        if not folder.has(name):
            continue
        data = folder.read_json(name)
        auto_maps = [data.get("auto_map")]
        if isinstance(data.get("image_processor"), dict):  # processors nest the image processor's config
            auto_maps.append(data["image_processor"].get("auto_map"))
        for auto_map in auto_maps:
            for auto_class, reference in (auto_map or {}).items():
                for ref in reference if isinstance(reference, (list, tuple)) else [reference]:
                    if ref is None:
                        continue
                    entry = f"{name}: auto_map[{auto_class!r}] = {ref!r}"
                    if not isinstance(ref, str):
                        folder.problems.append(f"{entry} is not a 'module.Class' string.")
                        continue
                    if "--" in ref:
                        folder.problems.append(
                            f"{entry} loads code from another repository; save the model with safevlm-hf so that "
                            "its code travels in this folder."
                        )
                        continue
                    module = ref.rsplit(".", 1)[0]
                    # transformers reads `module.Class` as the sibling file `module.py`: anything else (a path, an
                    # absolute or `..` module) would name a file outside the folder.
                    if "." not in ref or not module.isidentifier():
                        folder.problems.append(
                            f"{entry} does not name a code file inside the folder; expected 'module.Class' with "
                            "module.py next to config.json."
                        )
                        continue
                    if module not in modules:
                        modules.append(module)
    return modules


def _weight_files(folder: _Folder) -> list[str]:
    has_single, has_index = folder.has(SAFE_WEIGHTS_NAME), folder.has(SAFE_WEIGHTS_INDEX_NAME)
    if has_single and has_index:
        folder.problems.append(
            f"both {SAFE_WEIGHTS_NAME} and {SAFE_WEIGHTS_INDEX_NAME} are present; one is stale. Save the model again "
            "into an empty folder."
        )
        return []
    if has_single:
        return [SAFE_WEIGHTS_NAME]
    if has_index:
        weight_map = folder.read_json(SAFE_WEIGHTS_INDEX_NAME).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            folder.problems.append(f"{SAFE_WEIGHTS_INDEX_NAME}: has no 'weight_map'.")
            return []
        shards: set[str] = set()
        for tensor, shard in weight_map.items():
            entry = f"{SAFE_WEIGHTS_INDEX_NAME}: weight_map[{tensor!r}]"
            if not isinstance(shard, str):
                folder.problems.append(f"{entry} = {shard!r} is not a file name.")
                continue
            # The folder looks at each shard once (its answer is remembered), so this loop touches the file system
            # once per shard, not once per tensor; a refused shard is still reported under every tensor naming it.
            status = folder.status(shard, entry)
            if status == "file":
                shards.add(shard)
            elif status == "absent":
                folder.missing.append(f"{shard} (listed in {SAFE_WEIGHTS_INDEX_NAME})")
        return [SAFE_WEIGHTS_INDEX_NAME, *sorted(shards)]
    pickled = sorted(p.name for p in folder.root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    hint = (
        f" Found pickled files {pickled}: they are never uploaded; load the model and save_pretrained it to get "
        "safetensors."
        if pickled
        else ""
    )
    folder.missing.append(f"{SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} (the weights).{hint}")
    return []


def _code_files(folder: _Folder, modules: list[str]) -> list[str]:
    """The `auto_map` modules' files and, recursively, the sibling files they import (transformers' own parser)."""
    queue = [(f"{module}.py", "named by an auto_map") for module in modules]
    found: list[str] = []
    seen: set[str] = set()
    while queue:
        name, why = queue.pop(0)
        if name in seen:
            continue
        seen.add(name)
        status = folder.status(name)
        if status == "absent":
            folder.missing.append(f"{name} ({why})")
        if status != "file":
            continue
        found.append(name)
        queue += [
            (f"{module}.py", "imported by the code files") for module in get_relative_imports(folder.root / name)
        ]
    return found


def _plan_upload(folder: str | os.PathLike) -> tuple[list[str], list[str], list[str]]:
    """`(files to upload, missing files, other problems)` for a checkpoint folder."""
    root = Path(folder)
    if not root.is_dir():
        raise CheckpointFolderError(f"{root} is not a folder; pass the folder that save_pretrained wrote.")
    view = _Folder(root)

    view.need(CONFIG_NAME, "model config, from model.save_pretrained")
    view.need(GENERATION_CONFIG_NAME, "generation config, from model.save_pretrained")
    view.files += _weight_files(view)

    view.need(PROCESSOR_NAME, "processor config with its auto_map, from processor.save_pretrained")
    view.take_if_present(IMAGE_PROCESSOR_NAME)
    view.need(TOKENIZER_CONFIG_NAME, "from processor.save_pretrained")
    vocab = [name for name in TOKENIZER_VOCAB_FILES if view.has(name)]
    if not vocab and not any(view.status(name) == "refused" for name in TOKENIZER_VOCAB_FILES):
        view.missing.append(
            f"one of {list(TOKENIZER_VOCAB_FILES)} (the tokenizer vocabulary, from processor.save_pretrained)"
        )
    view.files += vocab
    for name in TOKENIZER_EXTRA_FILES:
        view.take_if_present(name)

    templates = [name for name in (CHAT_TEMPLATE_FILE, LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE) if view.has(name)]
    view.files += templates
    template_dir = root / CHAT_TEMPLATE_DIR
    if template_dir.is_symlink():
        view.status(f"{CHAT_TEMPLATE_DIR}/")  # refused: names the link
    elif template_dir.is_dir():
        names = [f"{CHAT_TEMPLATE_DIR}/{p.name}" for p in template_dir.iterdir() if p.suffix == ".jinja"]
        view.files += sorted(name for name in names if view.has(name))
    inline_template = any(
        "chat_template" in view.read_json(name) for name in (PROCESSOR_NAME, TOKENIZER_CONFIG_NAME) if view.has(name)
    )
    if not templates and not inline_template:
        view.missing.append(f"{CHAT_TEMPLATE_FILE} (the chat template, from processor.save_pretrained)")

    modules = _auto_map_modules(view) if view.has(CONFIG_NAME) else []
    if view.has(CONFIG_NAME) and not view.read_json(CONFIG_NAME).get("auto_map"):
        view.problems.append(f"{CONFIG_NAME} has no auto_map: trust_remote_code would find no model code.")
    view.files += _code_files(view, modules)

    view.need(MODEL_CARD_NAME, "the model card; model.save_pretrained writes it")
    # Dedupe in order: several auto_maps name the same module.
    return list(dict.fromkeys(view.files)), list(dict.fromkeys(view.missing)), view.problems


def remote_code_files(folder: str | os.PathLike) -> list[str]:
    """The files of `folder` that a `trust_remote_code=True` load (and the Hub page) needs, as relative paths.

    Weights (`*.safetensors` + index), `config.json`, `generation_config.json`, every code file named by an `auto_map`
    and its relative imports, the processor / image processor / tokenizer files, the chat template and `README.md`.
    Files that are needed but absent are not listed; [`check_upload_folder`] reports them.
    """
    return sorted(_plan_upload(folder)[0])


def check_upload_folder(folder: str | os.PathLike) -> list[str]:
    """Check that `folder` holds everything a remote-code load needs; return the files to upload.

    Raises:
        CheckpointFolderError: naming every missing file (and why it is needed) and every other problem.
    """
    files, missing, problems = _plan_upload(folder)
    if missing or problems:
        lines = [f"{folder} cannot be pushed as a SafeVLM checkpoint:"]
        lines += [f"  - missing: {item}" for item in missing]
        lines += [f"  - {item}" for item in problems]
        lines.append(
            "Save it with `model.save_pretrained(folder)` and `processor.save_pretrained(folder)` (SafeVLM writes the "
            "code files and README.md itself)."
        )
        raise CheckpointFolderError("\n".join(lines))
    root = Path(folder)
    uploaded = set(files)
    present = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    left_out = sorted(name for name in present if name not in uploaded)
    if left_out:
        logger.warning(f"Not uploading {len(left_out)} file(s) that a SafeVLM load does not need: {left_out}")
    return sorted(files)


def _operations(folder: Path, files: list[str], repo_id: str) -> list[CommitOperationAdd]:
    operations = []
    for name in files:
        source: str | bytes = str(folder / name)
        if name == MODEL_CARD_NAME:
            # A card we generated without a repo id gets it in its quick-start; the folder itself is not modified.
            text = (folder / name).read_text(encoding="utf-8")
            filled = fill_model_card_repo_id(text, repo_id)
            if filled != text:
                source = filled.encode("utf-8")
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=source))
    return operations


def _recheck_files(folder: Path, files: Sequence[str]) -> list[str]:
    """`files` (what [`check_upload_folder`] returned earlier), sorted, once each is checked again to be a regular file
    inside `folder`: cheap (no plan: nothing is read), and the folder may have changed since its check."""
    view = _Folder(folder)
    for name in files:
        view.need(name, "in the list of files to upload")
    if view.missing or view.problems:
        lines = [f"{folder}: cannot upload the given files:"]
        lines += [f"  - missing: {item}" for item in view.missing]
        lines += [f"  - {item}" for item in view.problems]
        raise CheckpointFolderError("\n".join(lines))
    return sorted(dict.fromkeys(view.files))


def push_to_hub(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    files: Sequence[str] | None = None,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> CommitInfo:
    """Upload a saved SafeVLM folder to `repo_id` in a single commit.

    The repository is created if needed (`private=True` makes a new one private; an existing repository keeps its
    visibility). With `revision`, the commit goes to that branch, created from `main` if it does not exist (a
    `refs/pr/N` revision goes to that pull request).

    `huggingface_hub.HfApi.create_commit` is used rather than `upload_folder` so that the commit holds exactly the
    checked list of files (no glob patterns) and the card can get the repo id without rewriting the user's folder.

    Args:
        files: the files to upload, as [`check_upload_folder`] returned them for `model_dir` (a [`PushCall`] holds
            them), so that a folder already checked is not planned again; each is still checked to be a regular file
            inside the folder. `None` (the default) checks the folder here.

    Returns:
        `huggingface_hub.CommitInfo`: `.oid` is the commit sha to pin as `revision=` when loading.
    """
    folder = Path(model_dir)
    files = check_upload_folder(folder) if files is None else _recheck_files(folder, files)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model").repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    return api.create_commit(
        repo_id,
        operations=_operations(folder, files, repo_id),
        commit_message=commit_message or f"Upload SafeVLM checkpoint ({len(files)} files)",
        revision=revision,
        repo_type="model",
    )


@dataclass(frozen=True)
class PushCall:
    """The arguments of one [`push_to_hub`] call, checked before anything touches the network."""

    model_dir: Path
    repo_id: str
    files: tuple[str, ...]
    private: bool = False
    revision: str | None = None
    token: str | None = field(default=None, repr=False)
    commit_message: str | None = None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for [`push_to_hub`]."""
        return {
            "model_dir": self.model_dir,
            "repo_id": self.repo_id,
            "files": list(self.files),  # already checked: push_to_hub does not plan the folder again
            "private": self.private,
            "revision": self.revision,
            "token": self.token,
            "commit_message": self.commit_message,
        }


def build_push_call(args: argparse.Namespace) -> PushCall:
    """Turn parsed `safevlm push` arguments into a [`PushCall`]; checks the folder and the token variable.

    Raises:
        CheckpointFolderError: the folder is incomplete (see [`check_upload_folder`]).
        ValueError: `--token-env` names an unset environment variable, or the repo id is not `owner/name` or `name`.
    """
    repo_id = args.repo_id.strip()
    if not repo_id or repo_id.count("/") > 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        raise ValueError(
            f"--repo-id must look like 'owner/name' (or 'name' for your namespace), got {args.repo_id!r}."
        )
    token = None  # huggingface_hub then uses HF_TOKEN or the login stored by `hf auth login`
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise ValueError(f"--token-env {args.token_env}: that environment variable is not set (or empty).")
    files = check_upload_folder(args.model)
    return PushCall(
        model_dir=Path(args.model),
        repo_id=repo_id,
        files=tuple(files),
        private=bool(args.private),
        revision=args.revision,
        token=token,
        commit_message=args.commit_message,
    )


__all__ = [
    "CheckpointFolderError",
    "PushCall",
    "build_push_call",
    "check_upload_folder",
    "push_to_hub",
    "remote_code_files",
]
