"""DFEW: the TFDS builder (`dfew.Dfew`) and its command line (`python -m data.dfew.build`)."""
