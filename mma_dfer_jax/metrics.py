"""Evaluation metrics as the paper reports them, and the run's logs and plots.

WAR (weighted average recall) is plain accuracy over all test clips; UAR (unweighted average recall) is the mean of
the per-class recalls. Both in percent.

Logs and plots go to local paths or URLs such as gs://bucket/run/metrics.jsonl (etils.epath).
"""
import io
import json

from etils import epath
import numpy as np


def confusion_matrix(labels, predictions, num_classes) -> np.ndarray:
  """(true class, predicted class) counts."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
  return matrix


def per_class_recall(matrix) -> np.ndarray:
  """Recall of each class in percent; NaN for a class absent from the test split."""
  support = matrix.sum(axis=1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return 100.0 * np.diag(matrix) / support


def summarize(matrix, class_names) -> dict:
  recall = per_class_recall(matrix)
  present = ~np.isnan(recall)
  return {
      'war': float(100.0 * np.trace(matrix) / max(1, matrix.sum())),
      'uar': float(np.mean(recall[present])) if present.any() else 0.0,
      'per_class_recall': {name: (None if np.isnan(r) else float(r)) for name, r in zip(class_names, recall)},
      'confusion_matrix': matrix.tolist(),
      'num_clips': int(matrix.sum()),
  }


def append_jsonl(path, record: dict) -> None:
  """Adds one JSON line. Object stores (gs://) cannot append: there the (small) file is read and written anew."""
  line = json.dumps(record) + '\n'
  path = epath.Path(path)
  if '://' not in str(path):
    with open(path, 'a') as f:
      f.write(line)
    return
  previous = path.read_text() if path.exists() else ''
  if previous and not previous.endswith('\n'):
    previous += '\n'
  path.write_text(previous + line)


def read_jsonl(path) -> list:
  path = epath.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_learning_curves(records: list, path) -> None:
  """Train loss per epoch and test WAR/UAR per epoch."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  epochs = [r for r in records if r.get('kind') == 'epoch']
  if not epochs:
    return
  x = [r['epoch'] for r in epochs]
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
  ax_loss.plot(x, [r['train_loss'] for r in epochs], marker='o')
  ax_loss.set(xlabel='epoch', ylabel='train loss', title='Training loss')
  ax_acc.plot(x, [r['war'] for r in epochs], marker='o', label='WAR')
  ax_acc.plot(x, [r['uar'] for r in epochs], marker='s', label='UAR')
  ax_acc.set(xlabel='epoch', ylabel='%', title='Test recall', ylim=(0, 100))
  ax_acc.legend()
  fig.tight_layout()
  _save_figure(fig, path)
  plt.close(fig)


def plot_confusion_matrix(matrix, class_names, path, title='') -> None:
  """Row-normalised confusion matrix (each true class sums to 1), with class names."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  matrix = np.asarray(matrix, np.float64)
  normalised = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
  n = len(class_names)
  fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 0.8 + 0.6 * n))
  ax.imshow(normalised, cmap='Blues', vmin=0, vmax=1)
  ax.set_xticks(range(n), class_names, rotation=45, ha='right')
  ax.set_yticks(range(n), class_names)
  ax.set(xlabel='predicted', ylabel='true', title=title or 'Normalised confusion matrix')
  for i in range(n):
    for j in range(n):
      ax.text(j, i, f'{normalised[i, j]:.2f}', ha='center', va='center',
              color='white' if normalised[i, j] > 0.5 else 'black', fontsize=8)
  fig.tight_layout()
  _save_figure(fig, path)
  plt.close(fig)


def _save_figure(fig, path) -> None:
  """Renders in memory, then writes the bytes: matplotlib cannot write to gs:// itself."""
  path = epath.Path(path)
  buffer = io.BytesIO()
  fig.savefig(buffer, dpi=100, format=path.suffix[1:].lower() or 'png')
  path.write_bytes(buffer.getvalue())


def cross_validation_table(fold_summaries: dict) -> tuple:
  """Per-fold and mean +- std WAR/UAR, as the paper's tables: (markdown, json-able dict)."""
  folds = sorted(fold_summaries)
  war = np.array([fold_summaries[f]['war'] for f in folds])
  uar = np.array([fold_summaries[f]['uar'] for f in folds])
  lines = ['| fold | WAR | UAR |', '| --- | --- | --- |']
  lines += [f'| {f} | {w:.2f} | {u:.2f} |' for f, w, u in zip(folds, war, uar)]
  lines.append(f'| mean +- std | {war.mean():.2f} +- {war.std():.2f} | {uar.mean():.2f} +- {uar.std():.2f} |')
  table = {'folds': {str(f): {'war': float(w), 'uar': float(u)} for f, w, u in zip(folds, war, uar)},
           'war_mean': float(war.mean()), 'war_std': float(war.std()),
           'uar_mean': float(uar.mean()), 'uar_std': float(uar.std())}
  return '\n'.join(lines) + '\n', table
