"""The shape of the package: imports point one way, and each layer pulls in only what it needs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import minigpt

PACKAGE = Path(minigpt.__file__).resolve().parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))  # "__init__" is the package itself
IO_LIBRARIES = ("safetensors", "huggingface_hub", "datasets", "tokenizers", "transformers")


def _module_or_package(name: str) -> str:
    """`from . import name`: a module of the package, or else a name defined in its __init__."""
    return name if (PACKAGE / f"{name}.py").is_file() else "__init__"


def imports_of(module: str, path: Path | None = None) -> tuple[set[str], set[str]]:
    """(minigpt modules, other top-level packages) that `module` (or the file at `path`) imports
    anywhere in its file, inside functions included."""
    ours, others = set(), set()
    tree = ast.parse((path or PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:  # from .x import y / from . import x
            if node.module:
                ours.add(node.module.split(".")[0])
            else:
                ours.update(_module_or_package(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = node.module.split(".")
            if parts[0] != "minigpt":
                others.add(parts[0])
            elif len(parts) > 1:  # from minigpt.x import y
                ours.add(parts[1])
            else:  # from minigpt import x
                ours.update(_module_or_package(alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "minigpt" and len(parts) > 1:
                    ours.add(parts[1])
                else:
                    others.add(parts[0])
    return ours, others


GRAPH = {module: imports_of(module)[0] for module in MODULES}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in GRAPH[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_parser_sees_imports_inside_functions():
    # hub.py imports huggingface_hub and datasets inside functions only, never at the top
    assert {"huggingface_hub", "datasets"} <= imports_of("hub")[1]
    assert {"model", "checkpoint", "hf", "hub"} <= GRAPH["loading"]
    assert set(GRAPH) >= {"model", "files", "data", "sources", "loading", "hub", "training_speed"}


def test_the_import_graph_has_no_cycle():
    for module in MODULES:
        assert module not in reachable(module), f"{module} imports itself through {sorted(reachable(module))}"
    assert all(dep in GRAPH for deps in GRAPH.values() for dep in deps)  # no import of a missing module


def test_the_model_imports_only_its_config():
    assert reachable("model") <= {"config", "errors"}
    assert imports_of("model")[1] <= {"__future__", "math", "torch"}


def test_the_model_is_the_plain_definition():
    """No speed code in model.py: no autograd Functions, no device-type or compile branches."""
    source = (PACKAGE / "model.py").read_text(encoding="utf-8")
    assert len(source.splitlines()) <= 330
    tree = ast.parse(source)
    bases = {ast.unparse(base) for node in ast.walk(tree) if isinstance(node, ast.ClassDef) for base in node.bases}
    assert bases <= {"nn.Module"}, bases
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not attributes & {"type", "is_compiling", "is_autocast_enabled", "Function"}


def test_no_module_is_over_450_lines():
    for module in MODULES:
        assert len((PACKAGE / f"{module}.py").read_text(encoding="utf-8").splitlines()) <= 450, module


def test_data_modules_know_the_tokenizer_and_files_never_the_model():
    for module in ("data", "sources", "formats"):
        deps = reachable(module)
        assert not deps & {"model", "checkpoint", "hf", "loading", "training_speed", "inference"}, module
    assert "tokenizer" in reachable("data") and "files" in reachable("data")
    assert "hub" in GRAPH["sources"]  # the Hub's ELI5 file comes through the one downloader


def test_the_file_helpers_the_hub_and_the_tokenizer_know_no_model():
    assert reachable("files") <= {"errors"}
    assert reachable("hub") <= {"errors"}
    assert reachable("tokenizer") <= {"errors", "files"}  # (files reads JSON, knows no model)
    assert "huggingface_hub" not in imports_of("tokenizer")[1]


def test_only_hub_downloads_from_the_hub():
    for module in MODULES:
        text = (PACKAGE / f"{module}.py").read_text(encoding="utf-8")
        named = [call for call in ("snapshot_download", "hf_hub_download", "load_dataset") if call in text]
        assert named == (["snapshot_download", "hf_hub_download", "load_dataset"] if module == "hub" else []), module


def calls_in(module: str) -> set[str]:
    """Every (dotted) name `module`'s code uses, `os.replace` say, and every name it imports."""
    names = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Name, ast.Attribute)):
            names.add(ast.unparse(node))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.name for alias in node.names)
            names.add(node.module or "")
    return names


def test_only_files_writes_by_temporary_copy_and_rename():
    """One atomic-write scheme: nothing but files.py renames into place, fsyncs or makes temporaries
    (runtime.py reads where temporaries go, `tempfile.gettempdir`, and makes none)."""
    makers = ("mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryDirectory", "TemporaryFile", "SpooledTemporaryFile")
    writes = {"os.replace", "os.rename", "os.fsync", "fsync", "fsync_tree", *(f"tempfile.{f}" for f in makers), *makers}
    assert {"os.replace", "os.fsync", "tempfile.mkdtemp", "fsync"} <= calls_in("files")
    for module in MODULES:
        if module != "files":
            assert not calls_in(module) & writes, module


def test_the_tokenizer_alone_knows_the_eos_id():
    """`<|endoftext|>`'s id comes from the tokenizer, never from a number written into the code."""
    for module in MODULES:
        if module != "tokenizer":
            assert "50256" not in (PACKAGE / f"{module}.py").read_text(encoding="utf-8"), module


def test_nothing_in_the_package_imports_transformers():
    for module in MODULES:
        assert "transformers" not in imports_of(module)[1], module


def test_importing_the_model_loads_no_io_library():
    """Checked in a fresh interpreter: what `import minigpt.model` really loads, transitively."""
    code = (
        "import sys, minigpt.model, minigpt.training_speed\n"
        f"print(sorted(m for m in {IO_LIBRARIES!r} if m in sys.modules))\n"
        "print(sorted(m for m in sys.modules if m.startswith('minigpt.')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent)
    loaded_io, loaded_ours = result.stdout.splitlines()
    assert loaded_io == "[]"
    assert loaded_ours == "['minigpt.config', 'minigpt.errors', 'minigpt.model', 'minigpt.training_speed']"


def test_the_trainer_and_the_decoding_loop_load_only_what_they_need():
    """In a fresh interpreter. The trainer knows nothing GPT-2-specific: no model, tokenizer, HF or
    checkpoint module (the converter's folder check, in the run folder's module, brought them all).
    The plain decoding loop loads no speed module (it imported CompiledDecoding for a type hint)."""
    assert not reachable("trainer") & {"tokenizer", "hf", "checkpoint", "loading", "data", "sampling"}
    code = ("import sys, minigpt.trainer\n"
            "print(sorted(m for m in sys.modules if m.startswith('minigpt.')))\n"
            "import minigpt.sampling, minigpt.streaming\n"
            "print(sorted(m for m in sys.modules if m.startswith('minigpt.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent)
    trainer, decoding = (set(line.strip("[]").replace("'", "").split(", ")) for line in result.stdout.splitlines())
    assert trainer == {f"minigpt.{m}" for m in ("ddp", "errors", "files", "metrics", "optim", "run_folder", "runtime",
                                                 "trainer")}
    assert not decoding & {f"minigpt.{m}" for m in ("compiled_decoding", "inference", "layouts", "quantized", "opaque")}


def test_train_py_parses_flags_and_calls_the_library():
    """The CLI is thin: its flags live in train_flags.py and its run in training_run.py, so the script
    defines nothing but `parse_args` and `main` and imports no other part of the library."""
    script = PACKAGE.parent / "train.py"
    assert imports_of("", script) == ({"cli", "train_flags", "training_run"}, {"__future__", "typing"})
    tree = ast.parse(script.read_text(encoding="utf-8"))
    assert [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))] == ["parse_args", "main"]
    assert not reachable("trainer") & {"training_run", "train_flags", "cli"}  # (the trainer knows no CLI)
