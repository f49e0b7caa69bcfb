"""Class names of each dataset, in the order of its labels (labels from 0).

DFEW and MAFW: the order of the reference's annotation lists, which the released models were trained with. DFEW's
is its official labels 1..7 minus one. MAFW's is the reference's own (the header comment of its
`annotation/preprocessing.py`, the same as DFER-CLIP's `class_names_11`), NOT the order of MAFW's class list (anger,
disgust, fear, ...): the MAFW builder maps the class names of the official split files onto it. The reference has
no lists for the other datasets: CREMA-D and RAVDESS follow the emotion codes of their file names, FERV39k takes
DFEW's classes (see the comments below).
"""

DFEW_CLASSES = ('happiness', 'sadness', 'neutral', 'anger', 'surprise', 'disgust', 'fear')
MAFW_CLASSES = ('happiness', 'sadness', 'neutral', 'anger', 'surprise', 'disgust', 'fear', 'contempt', 'anxiety',
                'helplessness', 'disappointment')
# CREMA-D: the emotion codes of its file names (ANG, DIS, FEA, HAP, NEU, SAD) in that order, as HiCMAE labels them.
CREMAD_CLASSES = ('anger', 'disgust', 'fear', 'happy', 'neutral', 'sad')
# RAVDESS: the third field of its file names, 01..08, minus one.
RAVDESS_CLASSES = ('neutral', 'calm', 'happy', 'sad', 'angry', 'fearful', 'disgust', 'surprised')
# FERV39k: Happy, Sad, Neutral, Angry, Surprise, Disgust, Fear (MAE-DFER's and DFER-CLIP's order): DFEW's classes.
FERV39K_CLASSES = DFEW_CLASSES

_BY_DATASET = {'dfew': DFEW_CLASSES, 'mafw': MAFW_CLASSES, 'cremad': CREMAD_CLASSES, 'ravdess': RAVDESS_CLASSES,
               'ferv39k': FERV39K_CLASSES}


def class_names(dataset: str, num_classes: int) -> tuple:
  """Names for `num_classes` labels: the dataset's own; the synthetic set borrows DFEW's first names (up to 7
  classes); any other dataset or count gets 'class_<k>'."""
  names = _BY_DATASET.get(dataset)
  if names is not None and len(names) == num_classes:
    return names
  if dataset == 'synthetic' and num_classes <= len(DFEW_CLASSES):
    return DFEW_CLASSES[:num_classes]
  return tuple(f'class_{k}' for k in range(num_classes))
