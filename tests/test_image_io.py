"""Input images: 8- and 16-bit PNGs read to the same values; unreadable files are errors naming the file."""
import numpy as np
import pytest
from PIL import Image

from varq_jax import image_io


@pytest.mark.parametrize("mode, peak", [("L", 255), ("I;16", 65535)])
def test_grayscale_png_depths_read_alike(tmp_path, mode, peak):
    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    path = str(tmp_path / f"{mode.replace(';', '')}.png")
    Image.fromarray(np.round(ramp * peak).astype(np.uint16 if peak > 255 else np.uint8)).save(path)
    assert Image.open(path).mode.startswith(mode[0])
    x = image_io.load_image(path, 32)
    assert x.shape == (32, 32, 3)
    np.testing.assert_allclose(x[..., 0], ramp * 2 - 1, atol=2 / 255 + 1e-6)     # not near-white


def test_unreadable_images_name_the_file(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="x.png"):
        image_io.load_image(str(bad), 32)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        image_io.load_image(str(tmp_path / "missing.png"), 32)
