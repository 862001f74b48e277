import pytest
from hardneg.models import Embedder
from PIL import Image, ImageDraw


@pytest.fixture(scope="session")
def tiny_embedder():
    """One tiny random Embedder per session; tests that change it work on a deepcopy."""
    return Embedder.tiny(seed=0)


def _image(colour, shape, size=32):
    im = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(im)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
    return im


@pytest.fixture(scope="session")
def items():
    """Text-only, image-only, image+text (placeholder) and image+text (no placeholder) items of
    different lengths, so batches are padded."""
    red = _image((255, 0, 0), "circle")
    blue = _image((0, 0, 255), "square", size=48)
    return [
        {"text": "a red circle", "image": None},
        {"text": None, "image": red},
        {
            "text": "<|image_1|>\nRepresent the given image with the question: what colour?",
            "image": blue,
        },
        {"text": "Find a caption describing the given image.", "image": red},
        {
            "text": "two blue squares on the left of a much longer caption with more words",
            "image": None,
        },
    ]
