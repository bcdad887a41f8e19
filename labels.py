"""The two labels every part of the project agrees on: 0 is background, 255 is ignored (no loss, not
in the metric). Class labels 1..K sit between them."""
BACKGROUND = 0
IGNORE = 255


def by_name(values, class_names, default) -> dict:
    """{class name: value} of the per-label values that differ from default (how ensemble.json stores
    per-class rules)."""
    return {name: value for name, value in zip(class_names, values) if value != default}


def by_label(rules: dict, class_names, default) -> list:
    """The per-label values of by_name's {class name: value}, default for the classes not named."""
    names = list(class_names)
    values = [default] * len(names)
    for name, value in rules.items():
        values[names.index(name)] = value
    return values
