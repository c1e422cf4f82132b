"""Static allow-list scan of the code that travels inside every checkpoint (run by `trust_remote_code=True` users).

Every `modeling/*.py` file (the `*_safevlm.py` files a checkpoint carries are copies of them) may use only what the
`ALLOWED` table lists, each entry with the reason it is safe; `DENIED` lists the exceptions to `ALLOWED`'s wildcards
and the attribute names refused on any object. To let the modeling code use something new, add one line to `ALLOWED`
saying why it is safe. Keys:

* `"torch.nn"`: the module may be imported or reached, under exactly that name (so `os.path.os`, reaching `os`
  through `os.path`, and `transformers.modeling_utils.os` fail even though `os` itself may be listed);
* `"torch.nn.*"`: every public member of the module that is not itself a module, minus the `DENIED` entries;
* `"json.loads"`: one member;
* `"builtins.len"`: a builtin name (`open`, `getattr`, `hasattr` only in the call forms below);
* `"*.__init__"`: a dunder attribute, on any object (every other dunder attribute is refused).

Rules, checked on the syntax tree:

1. Imports and module attribute chains resolve to `ALLOWED` modules and members (the chain is walked against the
   installed packages: a member that turns out to be a module must be listed as a module). A module name is only ever
   the root of an attribute chain, never a value (`m = os` fails). Sibling files: `from .x import y`, `x.py` in
   `modeling/`.
2. Names: a name is either bound in the file or an allowed builtin; anything else fails (`__builtins__`, `vars`,
   `globals`, `__import__`, `eval`, ...). Builtin names are not rebound.
3. `getattr`/`hasattr` take a literal attribute name, or a loop variable over a literal tuple of names, checked like
   `x.name`; `open` is only called directly, without `*`/`**` arguments or an `opener`, with a literal read-only mode.
   Neither is ever a value (`o = open` fails).
4. Attributes of other objects (whose type a static scan cannot know): dunders only from `ALLOWED`, and none of
   the `DENIED` `"*.name"` entries (file writes and deletes, pickling, native code, downloads: `tofile`, `save`,
   `write_text`, `load`, `hf_hub_download`, ...). String constants other than docstrings name no other dunder
   (`"{0.__globals__}".format(f)` fails).
5. `save_pretrained`, `push_to_hub`, `_upload_modified_files` only as `super().<same>(...)` inside the method of that
   name (the user's own save/push, delegated to transformers). `from_pretrained(...)` only with
   `local_files_only=True`, or inside `from_pretrained`, `from_llava` or `from_llava_processor` (loaders a user calls
   with the path/Hub id to load). `trust_remote_code=` only as a literal `False`.

The scan is a tripwire against changes in our own code, not a sandbox against a hostile author: pin a `revision` and
read the code you run.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import re
import types
from dataclasses import dataclass
from pathlib import Path

import pytest


MODELING_DIR = Path(__file__).resolve().parents[1] / "modeling"

# ----------------------------------------------------------------------------------------------- the tables
ALLOWED: dict[str, str] = {
    # standard library: pure computation, no files, processes, network or code loading
    "__future__.annotations": "postponed evaluation of annotations",
    "typing": "type hints",
    "typing.*": "type hints",
    "dataclasses": "dataclass declarations and conversions, in memory",
    "dataclasses.*": "dataclass declarations and conversions, in memory",
    "math": "arithmetic",
    "math.*": "arithmetic",
    "copy": "copies of configs and policies, in memory",
    "copy.*": "copies of configs and policies, in memory",
    "string": "only the members listed",
    "string.Formatter": "parses refusal templates to validate their fields",
    "json": "only the members listed (no json.load/json.dump: no file objects)",
    "json.loads": "a policy given as a JSON string",
    "json.dumps": "a policy as a JSON string (returned, not written)",
    "json.JSONDecodeError": "reports invalid policy JSON",
    "os": "only the members listed (no os.path, os.system, os.remove, os.environ, ...)",
    "os.PathLike": "isinstance checks on path arguments",
    "os.fspath": "a path-like as a string (no file access)",
    # torch: tensor code; what touches files or native libraries is in DENIED
    "torch": "tensors",
    "torch.*": "tensor functions, dtypes and classes",
    "torch.nn": "layers",
    "torch.nn.*": "layer classes and containers",
    "torch.nn.functional": "stateless layer functions",
    "torch.nn.functional.*": "stateless layer functions (gelu, softmax, cross_entropy, ...)",
    "torch.random": "only the member listed",
    "torch.random.fork_rng": "a seeded draw of the safety modules that leaves the global random state as it was",
    # transformers: the LLaVA classes SafeVLM extends and the utilities it plugs into
    "transformers": "the package; only the members listed",
    "transformers.LlavaConfig": "the configuration SafeVLMConfig extends",
    "transformers.LlavaForConditionalGeneration": "the model SafeVLM extends",
    "transformers.LlavaModel": "the base model SafeVLM extends",
    "transformers.LlavaProcessor": "the processor SafeVLMProcessor extends",
    "transformers.LlavaNextConfig": "the configuration SafeVLMNextConfig extends",
    "transformers.LlavaNextForConditionalGeneration": "the model SafeVLM-NeXT extends",
    "transformers.LlavaNextModel": "the base model SafeVLM-NeXT extends",
    "transformers.LlavaNextProcessor": "the processor SafeVLMNextProcessor extends",
    "transformers.PreTrainedModel": "PreTrainedModel.__init__ in the generating models' constructors",
    "transformers.models.llava_next.modeling_llava_next.LlavaNextPreTrainedModel": "the base of the NeXT classes",
    "transformers.models.llava_next.modeling_llava_next.image_size_to_num_patches": "anyres tiles per image",
    "transformers.AutoConfig": "reads a LLaVA config in from_llava (loader rule 5 applies)",
    "transformers.AutoProcessor": "loads a LLaVA processor in from_llava_processor (loader rule 5 applies)",
    "transformers.AutoTokenizer": "the safety tokenizer, local files only (loader rule 5 applies)",
    "transformers.initialization": "weight initialisation helpers",
    "transformers.initialization.*": "in-place tensor initialisers (normal_, zeros_, ...)",
    "transformers.activations.ACT2FN": "activation functions by name",
    "transformers.conversion_mapping.get_checkpoint_conversion_mapping": "renames of LLaVA weight keys on load",
    "transformers.conversion_mapping.register_checkpoint_conversion_mapping": "registers SafeVLM's key renames",
    "transformers.generation.LogitsProcessor": "base class of the safety gate",
    "transformers.generation.LogitsProcessorList": "passes the safety gate to generate()",
    "transformers.generation.GenerationMode": "gating allows only the decoding modes whose loop runs the gate",
    "transformers.generation.GenerateDecoderOnlyOutput": "the output of a gated call whose every row was refused",
    "transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS": "the safety head's attention follows attn_implementation",
    "transformers.utils.can_return_tuple": "return_dict=False support, as on LLaVA's own methods",
    "transformers.__version__": "warns when transformers is newer than the release the code was tested with",
    "transformers.modeling_outputs.*": "output dataclasses",
    "transformers.models.auto.AutoModel": "builds the vision tower and LLM from their configs",
    "transformers.models.llava.modeling_llava.*": "the LLaVA building blocks and outputs SafeVLM reuses",
    "transformers.processing_utils.MultiModalData": "the processor's multimodal token counts",
    "transformers.utils.logging": "the transformers logger",
    "transformers.utils.logging.*": "get_logger and verbosity helpers",
    # builtins
    "builtins.__name__": "the module's name, for its logger",
    "builtins.open": "reads a file; only called directly with a literal read-only mode (rule 3)",
    "builtins.getattr": "reads an attribute; only with a literal name or literal loop names (rule 3)",
    "builtins.hasattr": "tests an attribute; only with a literal name or literal loop names (rule 3)",
    "builtins.isinstance": "type checks",
    "builtins.type": "class of a value, for names in messages",
    "builtins.super": "delegation to transformers",
    "builtins.object": "base class",
    "builtins.classmethod": "decorator",
    "builtins.staticmethod": "decorator",
    "builtins.property": "decorator",
    "builtins.id": "cache key of a live object",
    "builtins.len": "sizes",
    "builtins.range": "loops",
    "builtins.enumerate": "loops",
    "builtins.zip": "loops",
    "builtins.sorted": "ordering",
    "builtins.min": "arithmetic",
    "builtins.max": "arithmetic",
    "builtins.sum": "arithmetic",
    "builtins.any": "logic",
    "builtins.all": "logic",
    "builtins.next": "first matching item",
    "builtins.bool": "value conversion",
    "builtins.int": "value conversion",
    "builtins.float": "value conversion",
    "builtins.str": "value conversion",
    "builtins.list": "containers",
    "builtins.tuple": "containers",
    "builtins.dict": "containers",
    "builtins.set": "containers",
    "builtins.frozenset": "containers",
    "builtins.slice": "indexing",
    "builtins.Exception": "error handling",
    "builtins.ImportError": "error handling",
    "builtins.OSError": "error handling",
    "builtins.RuntimeError": "error handling",
    "builtins.TypeError": "error handling",
    "builtins.ValueError": "error handling",
    "builtins.KeyError": "error handling",
    "builtins.IndexError": "error handling (a template that does not format)",
    "builtins.AttributeError": "error handling",
    "builtins.RecursionError": "error handling (policy JSON nested too deeply)",
    # dunder attributes (any other is refused: __globals__, __code__, __subclasses__, __dict__, __builtins__, ...)
    "*.__init__": "super().__init__(...) in constructors",
    "*.__post_init__": "super().__post_init__() in config dataclasses",
    "*.__name__": "class names in messages and the auto_map",
    "*.__module__": "the module file name for the auto_map",
    "*.__dataclass_fields__": "field names of the config dataclass",
    "*.__fspath__": "hasattr check for path-like arguments",
}

DENIED: dict[str, str] = {
    # exceptions to the wildcards above
    "torch.load": "unpickles arbitrary objects (code execution)",
    "torch.save": "writes files",
    "torch.from_file": "maps a file into a tensor",
    "torch.compile": "generates, compiles and caches native code",
    "torch.ops": "ops.load_library loads native libraries",
    "torch.classes": "classes.load_library loads native libraries",
    "typing.get_type_hints": "evaluates annotation strings with eval",
    "typing.ForwardRef": "a string that get_type_hints evaluates with eval",
    # attribute names refused on any object (a static scan cannot know the object's type)
    "*.tofile": "writes an array's buffer to a file (tensor.numpy().tofile)",
    "*.save": "writes files (ModelCard.save, Image.save, numpy.save, ...)",
    "*.load": "unpickles or downloads (torch.load, pickle.load, ModelCard.load)",
    "*.dump": "writes to a file object (json.dump, pickle.dump)",
    "*.open": "opens files (Path.open, Image.open, tarfile.open); only the builtin open() is checked",
    "*.write": "writes to a file object",
    "*.writelines": "writes to a file object",
    "*.write_text": "writes files",
    "*.write_bytes": "writes files",
    "*.to_json_file": "writes files",
    "*.unlink": "deletes files",
    "*.rmdir": "deletes folders",
    "*.rmtree": "deletes folders",
    "*.mkdir": "creates folders",
    "*.makedirs": "creates folders",
    "*.touch": "creates files",
    "*.chmod": "changes permissions",
    "*.rename": "moves files",
    "*.symlink_to": "creates links",
    "*.hardlink_to": "creates links",
    "*.system": "runs a shell command",
    "*.popen": "runs a process",
    "*.exec_module": "executes a module",
    "*.load_library": "loads a native library",
    "*.load_inline": "compiles and loads C++ code",
    "*.hf_hub_download": "downloads",
    "*.snapshot_download": "downloads",
    "*.cached_file": "downloads",
    "*.cached_files": "downloads",
    "*.get_file_from_repo": "downloads",
    "*.create_repo": "writes to the Hub",
    "*.upload_file": "writes to the Hub",
    "*.upload_folder": "writes to the Hub",
    "*.create_commit": "writes to the Hub",
    "*.urlopen": "opens a URL",
}

DELEGATE_ONLY_METHODS = frozenset({"save_pretrained", "push_to_hub", "_upload_modified_files"})
USER_LOAD_FUNCTIONS = frozenset({"from_pretrained", "from_llava", "from_llava_processor"})
CHECKED_BUILTIN_CALLS = frozenset({"open", "getattr", "hasattr"})  # allowed only in the call forms of rule 3
OPEN_KEYWORDS = frozenset({"mode", "encoding", "errors", "newline", "buffering"})
_DUNDER = re.compile(r"__\w+__")
_MISSING = object()


@dataclass(frozen=True)
class Violation:
    file: str
    line: int
    rule: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.rule}"


# ------------------------------------------------------------------------------------------ the allow-list
def _is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


def _roots() -> frozenset[str]:
    """Top-level packages with an ALLOWED entry: only these are imported to resolve names."""
    return frozenset(key.split(".")[0] for key in ALLOWED if not key.startswith(("*.", "builtins.")))


def _member(module: str, name: str):
    """`module.name` in the installed packages, or `_MISSING` (a name of another version is judged by name only)."""
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # ImportError, AttributeError, or a lazy module failing to import
        return _MISSING


def _import(spelled: str):
    """The module importable as `spelled`, or `_MISSING`."""
    try:
        return importlib.import_module(spelled)
    except Exception:
        return _MISSING


def module_problem(spelled: str, module: types.ModuleType | None = None) -> str | None:
    """Why the module reached as `spelled` may not be used (None when it may)."""
    if module is not None and module.__name__ != spelled and _import(spelled) is not module:
        return f"reaches module {module.__name__} as {spelled}; modules are reached only under their own listed name"
    if spelled not in ALLOWED:
        return f"uses module {spelled}, which is not in the allow-list"
    return None


def member_problem(module: str, name: str) -> str | None:
    """Why `module.name` (not itself a module) may not be used (None when it may)."""
    full = f"{module}.{name}"
    if full in ALLOWED:
        return None
    if _is_dunder(name):
        return attribute_problem(name)
    for key in (full, f"*.{name}"):
        if key in DENIED:
            return f"uses {full}: {DENIED[key]}"
    if f"{module}.*" in ALLOWED and not name.startswith("_"):
        return None
    return f"uses {full}, which is not in the allow-list"


def attribute_problem(name: str) -> str | None:
    """Why the attribute `.name` of an object of unknown type may not be used (None when it may)."""
    if _is_dunder(name):
        return None if f"*.{name}" in ALLOWED else f"uses the attribute {name}, which is not in the allow-list"
    if f"*.{name}" in DENIED:
        return f"uses .{name}: {DENIED[f'*.{name}']}"
    return None


# ------------------------------------------------------------------------------------------------ the scan
def _dotted(node: ast.AST) -> tuple[ast.Name, list[str]] | None:
    """`(root name, [attributes])` for a Name/Attribute chain `a.b.c`, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return (node, parts[::-1]) if isinstance(node, ast.Name) else None


def _is_super_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def _literal_strings(node: ast.AST) -> list[str] | None:
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
    ):
        return [e.value for e in node.elts]
    return None


def _bound_names(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            names.add(node.rest)
    return names


def _literal_loop_names(function: ast.AST) -> dict[str, list[str]]:
    """Names bound in `function` only as `for name in ("a", "b")` targets (loops and comprehensions): name -> values."""
    literal: dict[str, list[str]] = {}
    other: set[str] = set()
    loops = [n for n in ast.walk(function) if isinstance(n, (ast.For, ast.comprehension))]
    for loop in loops:
        values = _literal_strings(loop.iter)
        if isinstance(loop.target, ast.Name) and values is not None:
            literal.setdefault(loop.target.id, []).extend(values)
    targets = {id(loop.target) for loop in loops if isinstance(loop.target, ast.Name)}
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load) and id(node) not in targets:
            other.add(node.id)
        elif isinstance(node, ast.arg):
            other.add(node.arg)
    for loop in loops:
        if isinstance(loop.target, ast.Name) and _literal_strings(loop.iter) is None:
            other.add(loop.target.id)
    return {name: values for name, values in literal.items() if name not in other}


class _Scanner(ast.NodeVisitor):
    def __init__(self, filename: str, siblings: frozenset[str], tree: ast.Module):
        self.filename = filename
        self.siblings = siblings
        self.bound = _bound_names(tree)
        self.modules: dict[str, str] = {}  # local name -> module it is bound to
        self.functions: list[ast.AST] = []
        self.violations: list[Violation] = []
        self.parents: dict[int, ast.AST] = {id(c): n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
        self.docstrings = {
            id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
        }

    # ----------------------------------------------------------------------------------------------- helpers
    def flag(self, node: ast.AST, rule: str | None) -> None:
        if rule is not None:
            self.violations.append(Violation(self.filename, getattr(node, "lineno", 0), rule))

    def function(self) -> str | None:
        return self.functions[-1].name if self.functions else None

    def walk_chain(self, node: ast.AST, module: str, attributes: list[str]) -> None:
        """Check `module.a.b...`: modules reached must be listed under their own name, then one member, then
        object attributes."""
        for index, name in enumerate(attributes):
            value = _member(module, name)
            if isinstance(value, types.ModuleType):
                module = f"{module}.{name}"
                self.flag(node, module_problem(module, value))
                continue
            self.flag(node, member_problem(module, name))
            for attribute in attributes[index + 1 :]:
                self.flag(node, attribute_problem(attribute))
            return

    def check_attribute_of(self, node: ast.AST, target: ast.AST, name: str) -> None:
        """`target.name` (from getattr/hasattr): a module chain or an object attribute."""
        chain = _dotted(target)
        if chain is not None and chain[0].id in self.modules:
            self.walk_chain(node, self.modules[chain[0].id], [*chain[1], name])
        else:
            self.flag(node, attribute_problem(name))

    # ------------------------------------------------------------------------------------------------ imports
    def import_module(self, node: ast.AST, module: str, bind: str | None) -> None:
        if module.split(".")[0] not in _roots():
            self.flag(node, f"imports {module}, which is not in the allow-list")
            return
        self.flag(node, module_problem(module))
        if bind is not None:
            self.modules[bind] = module

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.asname:
                self.import_module(node, alias.name, alias.asname)
            else:  # `import a.b.c` binds `a` and reaches every prefix
                parts = alias.name.split(".")
                for end in range(1, len(parts) + 1):
                    self.import_module(node, ".".join(parts[:end]), parts[0] if end == 1 else None)

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
        if module.split(".")[0] not in _roots():
            self.flag(node, f"imports from {module}, which is not in the allow-list")
            return
        for alias in node.names:
            if alias.name == "*":
                self.flag(node, f"star import from {module}")
                continue
            value = _member(module, alias.name)
            if isinstance(value, types.ModuleType):
                spelled = f"{module}.{alias.name}"
                self.flag(node, module_problem(spelled, value))
                self.modules[alias.asname or alias.name] = spelled
            else:
                self.flag(node, member_problem(module, alias.name))

    # ------------------------------------------------------------------------------------------ definitions
    def check_binding(self, node: ast.AST, name: str) -> None:
        if hasattr(builtins, name) and not _is_dunder(name):
            self.flag(node, f"rebinds the builtin name {name}")

    def visit_arg(self, node: ast.arg) -> None:
        self.check_binding(node, node.arg)
        self.generic_visit(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.check_binding(node, node.name)
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.check_binding(node, node.name)
        self.functions.append(node)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    # ---------------------------------------------------------------------------------------- expressions
    def visit_Name(self, node: ast.Name) -> None:
        if not isinstance(node.ctx, ast.Load):
            self.check_binding(node, node.id)
            return
        parent = self.parents.get(id(node))
        if node.id in self.modules:
            chained = isinstance(parent, ast.Attribute) and parent.value is node
            looked_up = (  # getattr(module, "name") is checked as module.name
                isinstance(parent, ast.Call)
                and isinstance(parent.func, ast.Name)
                and parent.func.id in ("getattr", "hasattr")
                and parent.args[:1] == [node]
            )
            if not (chained or looked_up):
                self.flag(node, f"uses module {self.modules[node.id]} as a value; only module.member chains")
            return
        if node.id in self.bound:
            return
        if not hasattr(builtins, node.id):
            self.flag(node, f"uses the unknown name {node.id} (neither bound in this file nor an allowed builtin)")
        elif f"builtins.{node.id}" not in ALLOWED:
            self.flag(node, f"uses the builtin {node.id}, which is not in the allow-list")
        elif node.id in CHECKED_BUILTIN_CALLS and not (isinstance(parent, ast.Call) and parent.func is node):
            self.flag(node, f"uses {node.id} as a value; {node.id}() may only be called directly")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain = _dotted(node)
        if chain is not None and chain[0].id in self.modules:
            root, attributes = chain
            self.walk_chain(node, self.modules[root.id], attributes)
            self.visit(root)
            return
        self.flag(node, attribute_problem(node.attr))
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and id(node) not in self.docstrings:
            for dunder in _DUNDER.findall(node.value):
                if f"*.{dunder}" not in ALLOWED:
                    self.flag(node, f"string constant names the attribute {dunder}, which is not in the allow-list")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if isinstance(func, ast.Name) and func.id in CHECKED_BUILTIN_CALLS and func.id not in self.bound:
            if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                self.flag(node, f"{func.id}() with */** arguments (must be checkable)")
            elif func.id == "open":
                self.check_open(node)
            else:
                self.check_attribute_lookup(node)
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
        for kw in node.keywords:
            if kw.arg == "trust_remote_code" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                self.flag(node, "trust_remote_code other than a literal False (remote code must not load more)")
        self.generic_visit(node)

    def check_attribute_lookup(self, node: ast.Call) -> None:
        """getattr/hasattr: the name is a literal, or a loop variable over literal names; each is checked."""
        if len(node.args) < 2:
            self.flag(node, f"{node.func.id}() without an attribute name")
            return
        target, name = node.args[0], node.args[1]
        if isinstance(name, ast.Constant) and isinstance(name.value, str):
            names = [name.value]
        else:
            scope = self.functions[-1] if self.functions else None
            names = _literal_loop_names(scope).get(name.id) if scope and isinstance(name, ast.Name) else None
            if names is None:
                self.flag(node, f"{node.func.id}() with a computed attribute name (must be a literal)")
                return
        for value in names:
            self.check_attribute_of(node, target, value)

    def check_open(self, node: ast.Call) -> None:
        unknown = sorted(k.arg for k in node.keywords if k.arg not in OPEN_KEYWORDS)
        if unknown:
            self.flag(node, f"open() with {unknown} (only {sorted(OPEN_KEYWORDS)})")
        keyword_mode = next((k.value for k in node.keywords if k.arg == "mode"), None)
        mode = node.args[1] if len(node.args) > 1 else keyword_mode
        if len(node.args) > 2:
            self.flag(node, "open() with more than two positional arguments (use keywords)")
        if mode is None:
            return  # read-only text mode
        if not (isinstance(mode, ast.Constant) and isinstance(mode.value, str)):
            self.flag(node, "open() with a computed mode (must be a literal so it can be checked)")
        elif set(mode.value) & set("wax+"):
            self.flag(node, f"open(..., {mode.value!r}) writes a file; remote code writes none")


def scan_source(source: str, filename: str, siblings: frozenset[str] | None = None) -> list[Violation]:
    """Every rule violation in one source file (`filename` is its base name, e.g. `modeling_safevlm.py`)."""
    tree = ast.parse(source, filename=filename)
    scanner = _Scanner(filename, siblings if siblings is not None else _modeling_files(), tree)
    scanner.visit(tree)
    return scanner.violations


def _modeling_files() -> frozenset[str]:
    return frozenset(p.name for p in MODELING_DIR.glob("*.py"))


def test_the_tables_are_consistent():
    # Every entry says why; wildcards and members name modules that exist; nothing is both allowed and denied.
    assert all(reason.strip() for reason in [*ALLOWED.values(), *DENIED.values()])
    assert not set(ALLOWED) & set(DENIED)
    for key in ALLOWED:
        if key.startswith(("*.", "builtins.")):
            assert key.startswith("*.__") or hasattr(builtins, key.split(".", 1)[1]), key
            continue
        module, _, member = key.rpartition(".")
        if member == "*" or (module and not isinstance(_member(module, member), types.ModuleType)):
            assert isinstance(_import(module), types.ModuleType), f"{key}: no module {module}"
        else:
            assert isinstance(_import(key), types.ModuleType), f"{key}: not an importable module"


# --------------------------------------------------------------------------------------------- the real files
def test_every_file_that_travels_in_a_checkpoint_passes_the_scan():
    files = sorted(MODELING_DIR.glob("*.py"))
    assert {"modeling_safevlm.py", "configuration_safevlm.py", "policy_safevlm.py"} <= {p.name for p in files}
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
SIBLINGS = frozenset({"modeling_safevlm.py", "policy_safevlm.py", "configuration_safevlm.py"})

# name -> (source, a substring of the expected rule). Every way around the rules found so far stays here.
BAD_SNIPPETS = {
    "pickle import": ("import pickle\n", "pickle"),
    "subprocess import": ("import subprocess\n", "subprocess"),
    "aliased socket": ("import socket as s\n", "socket"),
    "shutil rmtree": ("import shutil\nshutil.rmtree('/x')\n", "shutil"),
    "sys module": ("import sys\nsys.modules['os'].system('ls')\n", "sys"),
    "requests": ("from requests import get\n", "requests"),
    "urllib": ("from urllib.request import urlopen\n", "urllib"),
    "importlib": ("import importlib\nimportlib.import_module('x')\n", "importlib"),
    "eval": ("x = eval('1 + 1')\n", "eval"),
    "exec": ("exec('print(1)')\n", "exec"),
    "builtin compile": ("code = compile('1', 'f', 'eval')\n", "compile"),
    "__import__": ("m = __import__('os')\n", "__import__"),
    "globals": ("g = globals()\n", "globals"),
    "dunder escape": ("x = ().__class__.__subclasses__()\n", "__subclasses__"),
    "function globals": ("def f(g):\n    return g.__globals__['os']\n", "__globals__"),
    "getattr trick": ("import torch\nf = getattr(torch, 'load')\n", "torch.load"),
    "computed getattr": ("def f(x, name):\n    return getattr(x, name)\n", "computed attribute name"),
    "computed getattr, reassigned loop name": (
        "def f(x, names):\n    for n in ('shape',):\n        pass\n    n = names[0]\n    return getattr(x, n)\n",
        "computed attribute name",
    ),
    "getattr over a literal loop with a dunder": (
        "def f(x):\n    return [getattr(x, n) for n in ('shape', '__globals__')]\n",
        "__globals__",
    ),
    "getattr as a value": ("g = getattr\n", "getattr as a value"),
    "vars()['__builtins__']": ("def f():\n    return vars()['__builtins__']['open']\n", "vars"),
    "__builtins__ name": ("b = __builtins__\n", "unknown name __builtins__"),
    "module __dict__": ("import torch\nd = torch.__dict__\n", "__dict__"),
    "dunder in a format string": ("def f(g):\n    return '{0.__globals__}'.format(g)\n", "__globals__"),
    "torch.load": ("import torch\nstate = torch.load('w.pt')\n", "torch.load"),
    "aliased torch.load": ("from torch import load as read_weights\nread_weights('w.pt')\n", "torch.load"),
    "torch.save": ("import torch as t\nt.save({}, 'w.pt')\n", "torch.save"),
    "torch.hub": ("import torch\ntorch.hub.load('a/b', 'm')\n", "torch.hub"),
    "torch.ops.load_library": ("import torch\ntorch.ops.load_library('x.so')\n", "torch.ops"),
    "torch.compile": ("import torch\nf = torch.compile(lambda x: x)\n", "torch.compile"),
    "cpp extension": ("from torch.utils.cpp_extension import load_inline\n", "cpp_extension"),
    "tensor tofile": ("def f(t):\n    t.numpy().tofile('x.bin')\n", "tofile"),
    "os.system": ("import os\nos.system('ls')\n", "os.system"),
    "os.remove": ("import os\nos.remove('f')\n", "os.remove"),
    "os.path.os.system": ("import os\nos.path.os.system('ls')\n", "os.path"),
    "a module reached through an allowed module": (
        "import torch\ntorch.nn.functional.torch.save({}, 'w.pt')\n",
        "reaches module torch as torch.nn.functional.torch",
    ),
    "transformers.modeling_utils.os": (
        "import transformers\ntransformers.modeling_utils.os.system('ls')\n",
        "transformers.modeling_utils",
    ),
    "os imported through transformers": (
        "from transformers.modeling_utils import os\nos.system('ls')\n",
        "reaches module os as transformers.modeling_utils.os",
    ),
    "module as a value": ("import os\nm = os\nm.remove('f')\n", "as a value"),
    "dynamic module loading": (
        "from transformers.dynamic_module_utils import get_class_from_dynamic_module\n",
        "dynamic_module_utils",
    ),
    "write mode": ("def f():\n    open('x.txt', 'w').close()\n", "open("),
    "append mode keyword": ("def f():\n    open('x.txt', mode='a')\n", "open("),
    "computed mode": ("def f(m):\n    open('x.txt', m)\n", "computed mode"),
    "mode through **": ("def f(p):\n    open(p, **{'mode': 'w'})\n", "open() with */** arguments"),
    "mode through *": ("def f(p):\n    open(p, *['w'])\n", "open() with */** arguments"),
    "opener": ("def f(p, o):\n    open(p, opener=o)\n", "opener"),
    "aliased open": ("o = open\n", "open as a value"),
    "open passed on": ("def f(run):\n    return run(open, 'x', 'w')\n", "open as a value"),
    "rebound builtin": ("def f(input):\n    return input\n", "rebinds the builtin name input"),
    "write on a handle": ("def f(h):\n    h.write('x')\n", ".write"),
    "path write_text": ("def f(p):\n    p.write_text('x')\n", "write_text"),
    "path open": ("def f(p):\n    return p.open('w')\n", ".open"),
    "model card save": ("from huggingface_hub import ModelCard\nModelCard('x').save('README.md')\n", ".save"),
    "hf download import": ("from huggingface_hub import hf_hub_download\n", "huggingface_hub"),
    "HfApi": ("from huggingface_hub import HfApi\n", "huggingface_hub"),
    "bare hub module": ("import huggingface_hub\n", "imports huggingface_hub"),
    "transformers hub util": ("from transformers.utils.hub import cached_file\n", "cached_file"),
    "model card load": ("from huggingface_hub import ModelCard\nModelCard.load('a/b')\n", ".load"),
    "network from_pretrained": (
        "from transformers import AutoTokenizer\ndef helper(p):\n    return AutoTokenizer.from_pretrained(p)\n",
        "from_pretrained",
    ),
    "nested remote code": (
        "def from_llava(p, X):\n    return X.from_pretrained(p, trust_remote_code=True)\n",
        "trust_remote_code",
    ),
    "save_pretrained elsewhere": ("def train(m):\n    m.save_pretrained('out')\n", "save_pretrained"),
    "push_to_hub elsewhere": ("def fit(m):\n    m.push_to_hub('a/b')\n", "push_to_hub"),
    "non-sibling relative import": ("from .evil import run\n", "not a sibling"),
    "parent relative import": ("from ..safevlm_hf import hub\n", "above the checkpoint folder"),
    "star import": ("from torch import *\n", "star import"),
    "annotation eval": ("import typing\ntyping.get_type_hints(typing.ForwardRef('x'))\n", "eval"),
}


@pytest.mark.parametrize("name", sorted(BAD_SNIPPETS))
def test_scanner_flags_each_forbidden_pattern(name):
    source, expected = BAD_SNIPPETS[name]
    violations = scan_source(source, "modeling_safevlm.py", SIBLINGS)
    assert violations, f"{name!r} passed the scan"
    assert any(expected in v.rule for v in violations), [str(v) for v in violations]


def test_remote_code_writes_no_file_anywhere():
    # The model card is written by the package, not by the code in the checkpoint: no write site is left.
    source = "def write_model_card(path):\n    with open(path, 'w') as f:\n        f.write('x')\n"
    assert len(scan_source(source, "modelcard_safevlm.py", SIBLINGS)) == 2


def test_scanner_accepts_what_the_model_code_legitimately_does():
    good = (
        "from __future__ import annotations\n"
        "import json, math, os\n"
        "import torch\n"
        "import torch.nn.functional as F\n"
        "from torch import nn\n"
        "from transformers import AutoTokenizer, LlavaForConditionalGeneration\n"
        "from transformers import initialization as init\n"
        "from transformers.utils import logging\n"
        "from .policy_safevlm import SafetyPolicy\n"
        "from . import configuration_safevlm\n"
        "logger = logging.get_logger(__name__)\n"
        "class M(LlavaForConditionalGeneration):\n"
        "    def __init__(self, config):\n"
        "        super().__init__(config)\n"
        "        self.head = nn.Linear(2, 2)\n"
        "        init.normal_(self.head.weight, std=0.02)\n"
        "    def save_pretrained(self, d, **kw):\n"
        "        super().save_pretrained(d, **kw)\n"
        "    @classmethod\n"
        "    def from_pretrained(cls, *a, **kw):\n"
        "        return super().from_pretrained(*a, **kw)\n"
        "    def tok(self, source):\n"
        "        return AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)\n"
        "    def forward(self, x):\n"
        "        scale = math.sqrt(x.shape[-1]) if isinstance(x, torch.Tensor) else 1.0\n"
        "        return F.gelu(torch.softmax(x, dim=-1) * scale) if getattr(self, 'head', None) else x\n"
        "    def labels(self):\n"
        "        return [getattr(self.config, name) for name in ('safety_types', 'safety_levels')]\n"
        "def name_of(path, obj):\n"
        "    text = os.fspath(path) if isinstance(path, os.PathLike) or hasattr(path, '__fspath__') else path\n"
        "    return f'{text}: {type(obj).__name__}'\n"
        "def read(path):\n"
        "    with open(path, encoding='utf-8') as f:\n"
        "        return json.loads(f.read())\n"
    )
    assert scan_source(good, "modeling_safevlm.py", SIBLINGS) == []


def test_scan_fails_on_a_changed_copy_of_the_real_modeling_file():
    # End to end on the real file: one added line that reaches the network is caught, with its line number.
    lines = (MODELING_DIR / "modeling_safevlm.py").read_text(encoding="utf-8").splitlines()
    at = lines.index("import torch")
    lines.insert(at, "from huggingface_hub import snapshot_download")
    violations = scan_source("\n".join(lines), "modeling_safevlm.py")
    assert violations and {v.line for v in violations} == {at + 1}, [str(v) for v in violations]
