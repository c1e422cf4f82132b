"""Static safety scan of the code that travels inside every checkpoint (run by `trust_remote_code=True` users).

Rules for every `modeling/*.py` file (the `*_safevlm.py` files a checkpoint carries are copies of them):

1. Imports: only the standard-library modules in `ALLOWED_STDLIB`, `torch`, `transformers`, `huggingface_hub` and
   sibling files (`from .x import y`, `x.py` in `modeling/`). Nothing from `FORBIDDEN_MODULES` (hub downloads,
   dynamic code loading, C++ extension builds, pickle-based serialization). From `huggingface_hub`, only the card
   classes in `HUB_ALLOWED_NAMES`, by name. No imported name in `FORBIDDEN_NAMES`.
2. No `eval`, `exec`, `compile`, `__import__`, `breakpoint`, `globals`, `locals`, `__builtins__` (as names), no
   `__globals__`/`__code__`/`__subclasses__`/`__builtins__`/`__import__` attributes, no `getattr(x, "<forbidden>")`.
3. Qualified names (imports resolved through aliases): nothing under `FORBIDDEN_QUALIFIED` (`torch.load`,
   `torch.save`, `torch.hub`, ...); from `os` only `OS_ALLOWED` (`os.path`, `os.PathLike`, `os.fspath`).
4. File writes: `open()` must be given a literal mode; a mode that writes (`w`, `a`, `x`, `+`) is allowed only inside
   `write_model_card` of `modelcard_safevlm.py`, and so are `.write()` / `.writelines()` calls. Methods that write or
   delete files (`write_text`, `unlink`, `mkdir`, `.save`, ...) are never called. `save_pretrained`, `push_to_hub`,
   `_upload_modified_files` may be called only as `super().<same>(...)` inside the method of that name (the user's own
   save/push request, delegated to transformers).
5. Network: `from_pretrained(...)` is called only with `local_files_only=True`, or inside `from_pretrained`,
   `from_llava` or `from_llava_processor` (loaders a user calls with the path/Hub id to load). No call of
   `hf_hub_download`, `snapshot_download`, `cached_file(s)`, `create_repo`, `upload_*`, `create_commit`,
   `ModelCard.load` (`X.load(...)` is allowed only as `json.load`). No `trust_remote_code=` other than a literal
   `False`.

The scan is a tripwire against accidental changes in our own code, not a sandbox against a hostile author: pin a
`revision` and read the code you run.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest


MODELING_DIR = Path(__file__).resolve().parents[1] / "modeling"

ALLOWED_STDLIB = frozenset(
    {
        "__future__",
        "abc",
        "collections",
        "copy",
        "dataclasses",
        "enum",
        "functools",
        "hashlib",
        "itertools",
        "json",
        "math",
        "os",
        "re",
        "string",
        "typing",
        "warnings",
    }
)
ALLOWED_THIRD_PARTY = frozenset({"torch", "transformers", "huggingface_hub"})
HUB_ALLOWED_NAMES = frozenset({"ModelCard", "ModelCardData", "EvalResult"})
FORBIDDEN_MODULES = (
    "torch.hub",
    "torch.package",
    "torch.serialization",
    "torch.utils.cpp_extension",
    "torch.utils.model_zoo",
    "transformers.dynamic_module_utils",
    "transformers.utils.hub",
)
FORBIDDEN_NAMES = frozenset(
    {
        "hf_hub_download",
        "snapshot_download",
        "cached_file",
        "cached_files",
        "HfApi",
        "hf_api",
        "create_repo",
        "upload_file",
        "upload_folder",
        "create_commit",
        "get_file_from_repo",
        "InferenceClient",
        "Repository",
        "load_inline",
        "load_library",
        "urlopen",
    }
)
FORBIDDEN_QUALIFIED = (
    "torch.load",
    "torch.save",
    "torch.hub",
    "torch.jit.load",
    "torch.jit.save",
    "torch.package",
    "torch.serialization",
    "torch.utils.cpp_extension",
    "torch.ops.load_library",
    "torch.classes.load_library",
    "transformers.dynamic_module_utils",
    "transformers.utils.hub",
)
OS_ALLOWED = ("os.path", "os.PathLike", "os.fspath")
FORBIDDEN_BUILTIN_NAMES = frozenset(
    {"eval", "exec", "compile", "__import__", "breakpoint", "globals", "locals", "__builtins__"}
)
FORBIDDEN_ATTRIBUTES = frozenset({"__globals__", "__code__", "__subclasses__", "__builtins__", "__import__"})
FILE_WRITE_METHODS = frozenset(
    {
        "write_text",
        "write_bytes",
        "unlink",
        "rmdir",
        "rmtree",
        "mkdir",
        "makedirs",
        "touch",
        "chmod",
        "symlink_to",
        "hardlink_to",
        "rename",
        "to_json_file",
        "save",
    }
)
DELEGATE_ONLY_METHODS = frozenset({"save_pretrained", "push_to_hub", "_upload_modified_files"})
NETWORK_CALLS = frozenset(FORBIDDEN_NAMES - {"load_inline", "load_library"})
USER_LOAD_FUNCTIONS = frozenset({"from_pretrained", "from_llava", "from_llava_processor"})
FILE_WRITE_SITES = frozenset({("modelcard_safevlm.py", "write_model_card")})


@dataclass(frozen=True)
class Violation:
    file: str
    line: int
    rule: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.rule}"


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _is_super_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


class _Scanner(ast.NodeVisitor):
    def __init__(self, filename: str, siblings: frozenset[str]):
        self.filename = filename
        self.siblings = siblings
        self.aliases: dict[str, str] = {}
        self.functions: list[str] = []
        self.violations: list[Violation] = []

    # ----------------------------------------------------------------------------------------------- helpers
    def flag(self, node: ast.AST, rule: str) -> None:
        self.violations.append(Violation(self.filename, getattr(node, "lineno", 0), rule))

    def function(self) -> str | None:
        return self.functions[-1] if self.functions else None

    def qualified(self, dotted: str) -> str:
        head, _, rest = dotted.partition(".")
        base = self.aliases.get(head, head)
        return f"{base}.{rest}" if rest else base

    def check_qualified(self, node: ast.AST, name: str) -> None:
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN_QUALIFIED):
            self.flag(node, f"uses {name}")
        if (name == "os" or name.startswith("os.")) and name != "os":
            if not any(name == ok or name.startswith(ok + ".") for ok in OS_ALLOWED):
                self.flag(node, f"uses {name}; only {list(OS_ALLOWED)} of os are allowed")

    # ------------------------------------------------------------------------------------------------ imports
    def check_module(self, node: ast.AST, module: str) -> None:
        top = module.split(".")[0]
        if top not in ALLOWED_STDLIB | ALLOWED_THIRD_PARTY:
            self.flag(node, f"imports {module}, which is not in the allow-list")
        if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN_MODULES):
            self.flag(node, f"imports {module}, a forbidden module")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.check_module(node, alias.name)
            if alias.name.split(".")[0] == "huggingface_hub":
                self.flag(node, "imports the huggingface_hub module; import only the card classes by name")
            top = alias.name.split(".")[0]  # `import a.b` binds `a`; `import a.b as c` binds `c` to `a.b`
            self.aliases[alias.asname or top] = alias.name if alias.asname else top
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            if node.level != 1:
                self.flag(node, "relative import above the checkpoint folder")
            targets = [node.module] if node.module else [alias.name for alias in node.names]
            for target in targets:
                if f"{target.split('.')[0]}.py" not in self.siblings:
                    self.flag(node, f"relative import of {target!r}, which is not a sibling file")
            return
        module = node.module or ""
        self.check_module(node, module)
        for alias in node.names:
            if alias.name == "*":
                self.flag(node, f"star import from {module}")
                continue
            if module.split(".")[0] == "huggingface_hub" and alias.name not in HUB_ALLOWED_NAMES:
                self.flag(node, f"imports {alias.name} from huggingface_hub; only {sorted(HUB_ALLOWED_NAMES)}")
            if alias.name in FORBIDDEN_NAMES:
                self.flag(node, f"imports {alias.name}")
            full = f"{module}.{alias.name}"
            self.check_qualified(node, full)
            self.aliases[alias.asname or alias.name] = full
        self.generic_visit(node)

    # ------------------------------------------------------------------------------------------ definitions
    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    # ---------------------------------------------------------------------------------------- expressions
    def visit_Name(self, node: ast.Name) -> None:
        if node.id in FORBIDDEN_BUILTIN_NAMES:
            self.flag(node, f"uses {node.id}")
        if node.id in self.aliases and isinstance(node.ctx, ast.Load):
            self.check_qualified(node, self.aliases[node.id])

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in FORBIDDEN_ATTRIBUTES:
            self.flag(node, f"uses the attribute {node.attr}")
        dotted = _dotted(node)
        if dotted is not None and dotted.split(".")[0] in self.aliases:
            self.check_qualified(node, self.qualified(dotted))
            return  # the chain's own names are checked through the qualified name
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        site = (self.filename, self.function())
        if name == "open" and isinstance(func, ast.Name):
            self.check_open(node, site)
        # getattr with a literal name is an attribute access in disguise (computed names read config fields)
        if name == "getattr" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
            if node.args[1].value in FORBIDDEN_ATTRIBUTES | FILE_WRITE_METHODS | NETWORK_CALLS | {"load", "system"}:
                self.flag(node, f"getattr(..., {node.args[1].value!r})")
        if name in ("write", "writelines") and isinstance(func, ast.Attribute) and site not in FILE_WRITE_SITES:
            self.flag(node, f".{name}() outside {sorted(FILE_WRITE_SITES)}")
        if name in FILE_WRITE_METHODS and isinstance(func, ast.Attribute):
            self.flag(node, f".{name}() writes or deletes files")
        if name in DELEGATE_ONLY_METHODS:
            delegated = isinstance(func, ast.Attribute) and _is_super_call(func.value) and self.function() == name
            if not delegated:
                self.flag(node, f"{name}() is only allowed as super().{name}() inside {name}()")
        if name == "from_pretrained":
            local_only = any(
                kw.arg == "local_files_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
                for kw in node.keywords
            )
            if not local_only and self.function() not in USER_LOAD_FUNCTIONS:
                self.flag(node, "from_pretrained() without local_files_only=True outside a user-called loader")
        if name in NETWORK_CALLS:
            self.flag(node, f"calls {name}()")
        if name == "load" and isinstance(func, ast.Attribute) and self.qualified(_dotted(func) or "") != "json.load":
            self.flag(node, f"calls {_dotted(func) or '.load'}(); only json.load is allowed")
        for kw in node.keywords:
            if kw.arg == "trust_remote_code" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                self.flag(node, "trust_remote_code other than a literal False (remote code must not load more)")
        self.generic_visit(node)

    def check_open(self, node: ast.Call, site: tuple[str, str | None]) -> None:
        keyword_mode = next((k.value for k in node.keywords if k.arg == "mode"), None)
        mode_node = node.args[1] if len(node.args) > 1 else keyword_mode
        if mode_node is None:
            return  # read-only text mode
        if not (isinstance(mode_node, ast.Constant) and isinstance(mode_node.value, str)):
            self.flag(node, "open() with a computed mode (must be a literal so it can be checked)")
            return
        if set(mode_node.value) & set("wax+") and site not in FILE_WRITE_SITES:
            self.flag(node, f"open(..., {mode_node.value!r}) writes a file outside {sorted(FILE_WRITE_SITES)}")


def scan_source(source: str, filename: str, siblings: frozenset[str] | None = None) -> list[Violation]:
    """Every rule violation in one source file (`filename` is its base name, e.g. `modeling_safevlm.py`)."""
    scanner = _Scanner(filename, siblings if siblings is not None else _modeling_files())
    scanner.visit(ast.parse(source, filename=filename))
    return scanner.violations


def _modeling_files() -> frozenset[str]:
    return frozenset(p.name for p in MODELING_DIR.glob("*.py"))


# --------------------------------------------------------------------------------------------- the real files
def test_every_file_that_travels_in_a_checkpoint_passes_the_scan():
    files = sorted(MODELING_DIR.glob("*.py"))
    assert {"modeling_safevlm.py", "configuration_safevlm.py", "modelcard_safevlm.py"} <= {p.name for p in files}
    violations = [v for path in files for v in scan_source(path.read_text(encoding="utf-8"), path.name)]
    assert not violations, "remote-code rule violations:\n" + "\n".join(map(str, violations))


def test_the_code_in_a_saved_checkpoint_is_the_scanned_code(saved_safevlm):
    carried = sorted(saved_safevlm.glob("*.py"))
    assert {p.name for p in carried} >= {"modeling_safevlm.py", "configuration_safevlm.py", "policy_safevlm.py"}
    for path in carried:
        source = MODELING_DIR / path.name
        assert source.is_file(), f"{path.name} travels in the checkpoint but is not a scanned modeling/ file"
        assert path.read_bytes() == source.read_bytes(), f"{path.name} in the checkpoint differs from modeling/"


def _weight_like_files(folder: Path) -> list[str]:
    return sorted(
        p.name
        for p in folder.rglob("*")
        if p.suffix
        in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".msgpack", ".h5", ".npz", ".npy", ".safetensors"}
    )


def test_saved_weights_are_safetensors_only(saved_safevlm, _tiny_safevlm_pair, tmp_path):
    assert _weight_like_files(saved_safevlm) == ["model.safetensors"]
    model, _ = _tiny_safevlm_pair
    model.save_pretrained(tmp_path, max_shard_size="400KB")  # sharded: index + several shards, still safetensors
    weights = _weight_like_files(tmp_path)
    assert len(weights) > 1 and all(name.endswith(".safetensors") for name in weights), weights
    assert (tmp_path / "model.safetensors.index.json").is_file()


# ------------------------------------------------------------------------------------------ the scanner itself
SIBLINGS = frozenset({"modeling_safevlm.py", "policy_safevlm.py", "modelcard_safevlm.py"})

BAD_SNIPPETS = {
    "pickle import": ("import pickle\n", "pickle"),
    "subprocess import": ("import subprocess\n", "subprocess"),
    "aliased socket": ("import socket as s\n", "socket"),
    "shutil rmtree": ("import shutil\nshutil.rmtree('/x')\n", "shutil"),
    "requests": ("from requests import get\n", "requests"),
    "urllib": ("from urllib.request import urlopen\n", "urllib"),
    "importlib": ("import importlib\nimportlib.import_module('x')\n", "importlib"),
    "eval": ("x = eval('1 + 1')\n", "eval"),
    "exec": ("exec('print(1)')\n", "exec"),
    "builtin compile": ("code = compile('1', 'f', 'eval')\n", "compile"),
    "__import__": ("m = __import__('os')\n", "__import__"),
    "dunder escape": ("x = ().__class__.__subclasses__()\n", "__subclasses__"),
    "getattr trick": ("import torch\nf = getattr(torch, 'load')\n", "getattr"),
    "torch.load": ("import torch\nstate = torch.load('w.pt')\n", "torch.load"),
    "aliased torch.load": ("from torch import load as read_weights\nread_weights('w.pt')\n", "torch.load"),
    "torch.save": ("import torch as t\nt.save({}, 'w.pt')\n", "torch.save"),
    "torch.hub": ("import torch\ntorch.hub.load('a/b', 'm')\n", "torch.hub"),
    "cpp extension": ("from torch.utils.cpp_extension import load_inline\n", "cpp_extension"),
    "os.system": ("import os\nos.system('ls')\n", "os.system"),
    "os.remove": ("import os\nos.remove('f')\n", "os.remove"),
    "write mode": ("def f():\n    open('x.txt', 'w').close()\n", "open("),
    "append mode keyword": ("def f():\n    open('x.txt', mode='a')\n", "open("),
    "computed mode": ("def f(m):\n    open('x.txt', m)\n", "computed mode"),
    "write outside the card writer": ("def f(h):\n    h.write('x')\n", ".write()"),
    "path write_text": ("def f(p):\n    p.write_text('x')\n", "write_text"),
    "model card save": ("from huggingface_hub import ModelCard\nModelCard('x').save('README.md')\n", ".save()"),
    "hf download import": ("from huggingface_hub import hf_hub_download\n", "hf_hub_download"),
    "HfApi": ("from huggingface_hub import HfApi\n", "HfApi"),
    "bare hub module": ("import huggingface_hub\n", "huggingface_hub module"),
    "transformers hub util": ("from transformers.utils.hub import cached_file\n", "cached_file"),
    "model card load": ("from huggingface_hub import ModelCard\nModelCard.load('a/b')\n", "ModelCard.load"),
    "network from_pretrained": ("def helper(p):\n    return AutoTokenizer.from_pretrained(p)\n", "from_pretrained"),
    "nested remote code": (
        "def from_llava(p):\n    return X.from_pretrained(p, trust_remote_code=True)\n",
        "trust_remote_code",
    ),
    "save_pretrained elsewhere": ("def train(m):\n    m.save_pretrained('out')\n", "save_pretrained"),
    "push_to_hub elsewhere": ("def fit(m):\n    m.push_to_hub('a/b')\n", "push_to_hub"),
    "non-sibling relative import": ("from .evil import run\n", "not a sibling"),
    "parent relative import": ("from ..safevlm_hf import hub\n", "above the checkpoint folder"),
}


@pytest.mark.parametrize("name", sorted(BAD_SNIPPETS))
def test_scanner_flags_each_forbidden_pattern(name):
    source, expected = BAD_SNIPPETS[name]
    violations = scan_source(source, "modeling_safevlm.py", SIBLINGS)
    assert violations, f"{name!r} passed the scan"
    assert any(expected in v.rule for v in violations), [str(v) for v in violations]


def test_scanner_flags_a_file_write_outside_write_model_card_even_in_the_card_file():
    source = "def render(path):\n    with open(path, 'w') as f:\n        f.write('x')\n"
    assert len(scan_source(source, "modelcard_safevlm.py", SIBLINGS)) == 2
    assert scan_source(source.replace("render", "write_model_card"), "modelcard_safevlm.py", SIBLINGS) == []
    assert scan_source(source.replace("render", "write_model_card"), "modeling_safevlm.py", SIBLINGS) != []


def test_scanner_accepts_what_the_model_code_legitimately_does():
    good = (
        "from __future__ import annotations\n"
        "import json, os, re\n"
        "import torch\n"
        "import torch.nn.functional as F\n"
        "from huggingface_hub import ModelCard, ModelCardData\n"
        "from transformers import AutoTokenizer, LlavaForConditionalGeneration\n"
        "from .policy_safevlm import SafetyPolicy\n"
        "from . import modelcard_safevlm\n"
        "pattern = re.compile('x')\n"
        "class M(LlavaForConditionalGeneration):\n"
        "    def save_pretrained(self, d, **kw):\n"
        "        super().save_pretrained(d, **kw)\n"
        "    @classmethod\n"
        "    def from_pretrained(cls, *a, **kw):\n"
        "        return super().from_pretrained(*a, **kw)\n"
        "    def tok(self, source):\n"
        "        return AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)\n"
        "    def forward(self, x):\n"
        "        return F.gelu(torch.compile(x)) if os.path.exists(os.fspath('a')) else x\n"
        "def read(path):\n"
        "    with open(path, encoding='utf-8') as f:\n"
        "        return json.load(f)\n"
    )
    assert scan_source(good, "modeling_safevlm.py", SIBLINGS) == []


def test_scan_fails_on_a_changed_copy_of_the_real_modeling_file():
    # End to end on the real file: one added line that reaches the network is caught, with its line number.
    lines = (MODELING_DIR / "modeling_safevlm.py").read_text(encoding="utf-8").splitlines()
    at = lines.index("import torch")
    lines.insert(at, "from huggingface_hub import snapshot_download")
    violations = scan_source("\n".join(lines), "modeling_safevlm.py")
    assert violations and {v.line for v in violations} == {at + 1}, [str(v) for v in violations]
