"""The two labels every part of the project agrees on: 0 is background, 255 is ignored (no loss, not
in the metric). Class labels 1..K sit between them."""
BACKGROUND = 0
IGNORE = 255
