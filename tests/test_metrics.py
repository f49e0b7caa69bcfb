"""WAR/UAR as the paper computes them, the cross-validation table and the plots."""
import numpy as np

from mma_dfer_jax import metrics


def test_war_is_accuracy_and_uar_the_mean_class_recall():
  labels = np.array([0, 0, 0, 0, 1, 1, 2])
  predictions = np.array([0, 0, 0, 1, 1, 0, 2])
  matrix = metrics.confusion_matrix(labels, predictions, 4)
  assert matrix.sum() == 7 and matrix[0, 1] == 1
  result = metrics.summarize(matrix, ('a', 'b', 'c', 'd'))
  assert result['war'] == 100 * 5 / 7
  assert np.isclose(result['uar'], 100 * (3 / 4 + 1 / 2 + 1) / 3)  # class d is absent: not averaged
  assert result['per_class_recall']['d'] is None


def test_cross_validation_table():
  markdown, table = metrics.cross_validation_table({1: {'war': 70.0, 'uar': 60.0}, 2: {'war': 80.0, 'uar': 50.0}})
  assert table['war_mean'] == 75.0 and table['war_std'] == 5.0 and table['uar_mean'] == 55.0
  assert '| mean +- std | 75.00 +- 5.00 | 55.00 +- 5.00 |' in markdown


def test_plots_are_written(tmp_path):
  records = [{'kind': 'epoch', 'epoch': e, 'train_loss': 1.0 / (e + 1), 'war': 50 + e, 'uar': 40 + e}
             for e in range(3)]
  metrics.plot_learning_curves(records, tmp_path / 'curves.png')
  metrics.plot_confusion_matrix([[3, 1], [0, 2]], ('happy', 'sad'), tmp_path / 'cm.png')
  assert (tmp_path / 'curves.png').stat().st_size > 1000 and (tmp_path / 'cm.png').stat().st_size > 1000
  metrics.append_jsonl(tmp_path / 'm.jsonl', records[0])
  metrics.append_jsonl(tmp_path / 'm.jsonl', records[1])
  assert metrics.read_jsonl(tmp_path / 'm.jsonl') == records[:2]
