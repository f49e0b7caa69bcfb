"""MAFW: the TFDS builder (`mafw.Mafw`) and its command line (`python -m data.mafw.build`)."""
