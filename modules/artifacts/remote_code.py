"""The code a pipeline folder carries, so that `DiffusionPipeline.from_pretrained(folder or Hub id,
trust_remote_code=True)` loads it without this repository.

The package: the modules of ours that the pipeline and the networks run, flat, as `<name>_<digest>.py` (the module's
last name part and a digest of the sources: exports of different versions of the code, loaded in one process, then
do not share modules), their imports of ours made relative. diffusers' loading rules shape the layout:

- it copies into its module cache only the files that an entry point imports relatively, from the entry point's own
  folder: so each folder with code holds the files its class needs (the root: the whole package; unet/,
  transformer/, a vae/ of ours: the network's module and what it imports), and its entry point (`pipeline.py`,
  `<folder>_model.py`) imports every one of them;
- from the Hub it downloads what the root entry point imports (and what those files import, from the root), and of
  a folder with weights only the entry point that model_index.json names: so the root entry point also names each
  component folder's files, under TYPE_CHECKING (named for the download, never run).

This module is part of the package: a loaded pipeline finds its package beside it, to save it again.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

# The package: the pipeline, the networks its components are, and every module of ours they import, recursively.
PACKAGE_ROOTS = ("modules.artifacts.pipeline", "modules.networks.presets")
_OWN_IMPORT = re.compile(r"^(\s*)from (modules(?:\.\w+)*) import (\w+)?", re.MULTILINE)
_HERE = Path(__file__).resolve()
# Loaded from a pipeline folder, this file is remote_code_<digest>.py among the other files of its package.
_LOADED_DIGEST = None if _HERE.stem == "remote_code" else _HERE.stem.rpartition("_")[2]


@dataclass
class CodePackage:
    digest: str
    sources: dict[str, str]  # module name (the last part) -> source, imports of ours relative

    def file_name(self, name: str) -> str:
        return f"{name}_{self.digest}"

    def needed_by(self, name: str) -> list[str]:
        """`name` and the package modules it imports, recursively."""
        imports = re.compile(rf"^\s*from \.(?:(\w+)_{self.digest} import| import (\w+)_{self.digest}\b)", re.MULTILINE)
        needed, todo = set(), [name]
        while todo:
            module = todo.pop()
            if module not in needed:
                needed.add(module)
                todo += [a or b for a, b in imports.findall(self.sources[module])]
        return sorted(needed)


def this_package() -> CodePackage:
    """The package this code runs from: built from the repository, or read back from a loaded pipeline's files."""
    if _LOADED_DIGEST is not None:
        suffix = f"_{_LOADED_DIGEST}"
        files = _HERE.parent.glob(f"*{suffix}.py")
        return CodePackage(_LOADED_DIGEST, {p.stem.removesuffix(suffix): p.read_text() for p in files})
    return _repository_package()


def _repository_package() -> CodePackage:
    """Follow the imports of ours from PACKAGE_ROOTS (`from modules.data.latents import x`, `from modules.data
    import latents`) and rewrite them relative (`from .latents_<digest> import x`, `from . import latents_<digest>
    as latents`)."""
    root = _HERE.parents[2]

    def file_of(module: str) -> Path:
        return root.joinpath(*module.split(".")).with_suffix(".py")

    def imported(match: re.Match) -> str:  # the module an import of ours brings in
        module, first = match.group(2), match.group(3)
        return module if file_of(module).is_file() else f"{module}.{first}"

    texts, paths, todo = {}, {}, list(PACKAGE_ROOTS)
    while todo:
        path = file_of(todo.pop())
        if path.stem in paths:
            if paths[path.stem] != path:
                raise RuntimeError(f"{paths[path.stem]} and {path} would have the same name in the exported package")
            continue
        paths[path.stem], texts[path.stem] = path, path.read_text()
        todo += [imported(m) for m in _OWN_IMPORT.finditer(texts[path.stem])]
    package = CodePackage(hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()[:10], {})

    def relative(match: re.Match) -> str:
        indent, module, first = match.groups()
        if file_of(module).is_file():
            return f"{indent}from .{package.file_name(module.rpartition('.')[2])} import {first or ''}"
        return f"{indent}from . import {package.file_name(first)} as {first}"

    for name, text in texts.items():
        package.sources[name] = _OWN_IMPORT.sub(relative, text)
        if re.search(r"^\s*(from|import) modules\b", package.sources[name], re.MULTILINE):
            raise RuntimeError(f"{paths[name]} imports modules in a form the export does not rewrite")
    return package


def own_module(cls: type) -> str | None:
    """The package module (its last name part) that defines `cls`, or None for a class that is not ours."""
    module = cls.__module__
    if _LOADED_DIGEST is None:
        return module.rpartition(".")[2] if module.startswith("modules.") else None
    stem, suffix = module.rpartition(".")[2], f"_{_LOADED_DIGEST}"
    return stem.removesuffix(suffix) if stem.endswith(suffix) else None


def write_code(folder: Path, package: CodePackage, entry: str, cls: type, components: dict[str, type] | None = None):
    """The entry point `<entry>.py` (as model_index.json names it), which names `cls`, and the package files it needs
    beside it. The root's (`components`: our component folders and their classes) holds the whole package and names
    each component folder's files."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(package.sources) if components is not None else package.needed_by(own_module(cls))
    for name in names:
        (folder / f"{package.file_name(name)}.py").write_text(package.sources[name])
    lines = [
        f'"""{cls.__name__}, for diffusers\' custom code loading; the code is in the *_{package.digest}.py files."""',
        "",
        "# diffusers copies to its module cache only the files imported here: so, every file the class needs.",
        *(f"from .{package.file_name(name)} import __name__ as _  # noqa: F401" for name in names),
        f"from .{package.file_name(own_module(cls))} import {cls.__name__}  # noqa: F401",
        "",
    ]
    if components:
        lines[1:1] = ["", "from typing import TYPE_CHECKING"]
        lines += ["if TYPE_CHECKING:  # diffusers downloads a component folder's code from the Hub only if named here"]
        for sub, sub_cls in components.items():
            needed = package.needed_by(own_module(sub_cls))
            lines += [
                f"    from .{sub}.{package.file_name(name)} import __name__ as _  # noqa: F401" for name in needed
            ]
        lines.append("")
    (folder / f"{entry}.py").write_text("\n".join(lines))
