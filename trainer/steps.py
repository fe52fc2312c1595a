"""The evaluation step every prediction goes through: validation, test.py, out-of-fold predictions and TTA."""


def as_inputs(data):
    """A batch's inputs as a tuple: one image tensor, or the images followed by other inputs (features)."""
    return data if isinstance(data, tuple) else (data,)


def evaluation_step(model, data):
    """The model's whole output (a tensor, tuple or dict) for a batch's inputs: `model(*inputs)`."""
    return model(*as_inputs(data))


def tta_view(transform, data):
    """A batch seen through a TTA transform: the images (the first input) transformed, other inputs unchanged."""
    images, *others = as_inputs(data)
    return (transform(images), *others) if others else transform(images)
