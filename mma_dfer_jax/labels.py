"""Class names of each dataset, in the label order the reference's annotation lists use (labels from 0)."""

DFEW_CLASSES = ('happiness', 'sadness', 'neutral', 'anger', 'surprise', 'disgust', 'fear')
MAFW_CLASSES = ('anger', 'disgust', 'fear', 'happiness', 'neutral', 'sadness', 'surprise', 'contempt', 'anxiety',
                'helplessness', 'disappointment')

_BY_DATASET = {'dfew': DFEW_CLASSES, 'mafw': MAFW_CLASSES}


def class_names(dataset: str, num_classes: int) -> tuple:
  """Names for `num_classes` labels; the synthetic set (or any other count) gets 'class_<k>'."""
  names = _BY_DATASET.get(dataset)
  if names is not None and len(names) == num_classes:
    return names
  if dataset == 'synthetic' and num_classes <= len(DFEW_CLASSES):
    return DFEW_CLASSES[:num_classes]
  return tuple(f'class_{k}' for k in range(num_classes))
