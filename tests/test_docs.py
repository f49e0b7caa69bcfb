"""The docs stay true to the code: every file and every `module.name` that docs/*.md and README.md name exists, and
no source file points at documents that are not in the repository.

Names are checked by reading the source (ast), not by importing it, so the test needs no JAX and takes well under
a second.
"""
import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / 'docs').glob('*.md')) + [ROOT / 'README.md']
PACKAGES = ('mma_dfer_jax', 'configs', 'data')  # dotted names starting with these are checked
FILE_SUFFIXES = ('.py', '.md', '.cc', '.toml', '.txt')
ROOT_FILES = ('launch.py', 'pyproject.toml', 'requirements.txt')
# Documents that live outside the repository; nothing in it may point at them (spelt in two parts so that this file
# does not name them itself).
OUTSIDE_DOCUMENTS = ('REFERENCE' + '.md', 'DESIGN' + '.md')

_CODE = re.compile(r'```.*?```|`[^`\n]+`', re.S)
_LINK = re.compile(r'\]\(([^)\s]+)\)')
_TOKEN = re.compile(r'[A-Za-z0-9_./-]+')


def code_tokens(text: str) -> set:
  """Words of the inline code spans and fenced blocks of a Markdown text."""
  return {token.strip('.') for span in _CODE.findall(text) for token in _TOKEN.findall(span.strip('`'))}


def file_references(text: str) -> set:
  """Repository paths named in code: a path with a folder (`mma_dfer_jax/train.py`), a top-level document
  (`BENCHMARKS.md`) or file (`launch.py`). A bare module file name (`cli.py`) is ambiguous and not checked."""
  return {t for t in code_tokens(text) if t.endswith(FILE_SUFFIXES) and not t.startswith(('.', '/'))
          and ('/' in t or t[0].isupper() or t in ROOT_FILES)}


def link_targets(text: str) -> set:
  """Relative Markdown link targets (no URLs, no anchors)."""
  return {target.split('#')[0] for target in _LINK.findall(text)
          if '://' not in target and not target.startswith(('#', 'mailto:'))} - {''}


def dotted_names(text: str) -> set:
  """`package.module.name` references in code, e.g. `mma_dfer_jax.train.train_step`."""
  return {t for t in code_tokens(text)
          if t.split('.')[0] in PACKAGES and '.' in t and '/' not in t and not t.endswith(FILE_SUFFIXES)}


@functools.lru_cache(maxsize=None)
def _module_names(path: Path) -> dict:
  """Top-level names a module defines or imports -> the ast node (class bodies are looked into on demand)."""
  tree = ast.parse(path.read_text())
  names = {}
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      names[node.name] = node
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
        for name in ast.walk(target):
          if isinstance(name, ast.Name):
            names[name.id] = node
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      for alias in node.names:
        names[(alias.asname or alias.name).split('.')[0]] = node
  return names


def _module_file(parts) -> Path:
  base = ROOT.joinpath(*parts)
  for candidate in (base.with_suffix('.py'), base / '__init__.py'):
    if candidate.is_file():
      return candidate
  return None


def resolves(dotted: str) -> bool:
  """Whether `dotted` names a module, or a name (and class attributes below it) defined in a module's source. A name
  a module imports from this repository is followed to where it is defined."""
  parts = dotted.split('.')
  for split in range(len(parts), 0, -1):
    module = _module_file(parts[:split])
    if module is None:
      continue
    rest = parts[split:]
    if not rest:
      return True
    node = _module_names(module).get(rest[0])
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      return _imported_resolves(node, rest)
    for attribute in rest[1:]:
      if not isinstance(node, ast.ClassDef):
        return False
      node = next((n for n in node.body if getattr(n, 'name', None) == attribute
                   or (isinstance(n, (ast.Assign, ast.AnnAssign)) and attribute in _assigned(n))), None)
    return node is not None
  return False


def _imported_resolves(node, rest) -> bool:
  """`rest[0]` is imported by `node`: follow it when it comes from this repository (outside code is taken as is)."""
  alias = next(a for a in node.names if (a.asname or a.name).split('.')[0] == rest[0])
  if isinstance(node, ast.ImportFrom):
    source = f'{node.module}.{alias.name}'
  else:
    source = alias.name if alias.asname else rest[0]
  if source.split('.')[0] not in PACKAGES or (isinstance(node, ast.ImportFrom) and node.level):
    return True
  return resolves('.'.join([source] + rest[1:]))


def _assigned(node) -> set:
  targets = node.targets if isinstance(node, ast.Assign) else [node.target]
  return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def test_docs_exist():
  names = {doc.name for doc in DOCS}
  assert {'model.md', 'training.md', 'data.md', 'performance.md'} <= names


@pytest.mark.parametrize('doc', DOCS, ids=lambda d: d.name)
def test_named_files_exist(doc):
  text = doc.read_text()
  missing = sorted(p for p in file_references(text) if not (ROOT / p).exists())
  missing += sorted(t for t in link_targets(text) if not (doc.parent / t).exists())
  assert not missing, f'{doc.name} names files that do not exist: {missing}'


@pytest.mark.parametrize('doc', DOCS, ids=lambda d: d.name)
def test_named_code_exists(doc):
  missing = sorted(name for name in dotted_names(doc.read_text()) if not resolves(name))
  assert not missing, f'{doc.name} names code that does not exist: {missing}'


def test_no_source_points_outside_the_repository():
  sources = [p for folder in PACKAGES + ('tests',) for p in (ROOT / folder).rglob('*.py')]
  sources += [ROOT / 'launch.py']
  pointing = [f'{p.relative_to(ROOT)}:{i}' for p in sources if p.is_file()
              for i, line in enumerate(p.read_text().splitlines(), 1) if any(d in line for d in OUTSIDE_DOCUMENTS)]
  assert not pointing, f'these lines point at documents outside the repository (point at docs/ instead): {pointing}'


def test_checks_can_fail():
  """The checkers find what they should: a missing file, a missing name, a missing class attribute."""
  text = ('See `mma_dfer_jax/no_such_file.py`, `mma_dfer_jax.train.no_such_function`, '
          '`mma_dfer_jax.models.vit.EncoderBlock.no_such_attribute` and [x](no_such.md).')
  assert 'mma_dfer_jax/no_such_file.py' in file_references(text)
  assert 'no_such.md' in link_targets(text)
  assert not resolves('mma_dfer_jax.train.no_such_function')
  assert not resolves('mma_dfer_jax.models.vit.EncoderBlock.no_such_attribute')
  assert resolves('mma_dfer_jax.models.vit.EncoderBlock.num_heads')
  assert resolves('mma_dfer_jax.train.train_step') and resolves('mma_dfer_jax.models')
  assert resolves('mma_dfer_jax.input_pipeline.frame_indices')  # imported from frames.py, followed there
  assert not resolves('mma_dfer_jax.input_pipeline.frame_indices.no_such_attribute')
  assert dotted_names('`python -m mma_dfer_jax.bench --config configs/dfew.py`') == {'mma_dfer_jax.bench'}
