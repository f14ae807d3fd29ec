"""The synthetic shapes dataset: deterministic per (seed, split, index), balanced, in range, classes distinct."""
import jax
import numpy as np
import pytest

from varq_jax.data import shapes

SIZE = 32        # small images keep the rendering compile fast; the class geometry does not depend on size
N = 20           # one batch length throughout: one compilation
_render = jax.jit(shapes.render, static_argnums=2)


def _batch(seed, indices, split="train", size=SIZE):
    images, labels = shapes.make_batch_uint8(seed, np.asarray(indices), split=split, image_size=size)
    return np.asarray(images), np.asarray(labels)


def test_image_is_a_function_of_seed_split_and_index_only():
    images, labels = _batch(3, np.arange(N))
    again, _ = _batch(3, np.arange(N))
    np.testing.assert_array_equal(images, again)
    # the same index inside another batch, at another position, renders the same image
    order = np.random.default_rng(0).permutation(N)
    shuffled, shuffled_labels = _batch(3, order)
    np.testing.assert_array_equal(shuffled, images[order])
    np.testing.assert_array_equal(shuffled_labels, labels[order])
    other_seed, _ = _batch(4, np.arange(N))
    other_split, _ = _batch(3, np.arange(N), split="test")
    for other in (other_seed, other_split):
        assert np.mean(other != images) > 0.5, "another seed or split must give other images"


def test_classes_are_balanced_and_labels_follow_the_index():
    _, labels = _batch(0, np.arange(130, 130 + N))
    np.testing.assert_array_equal(np.bincount(labels, minlength=shapes.NUM_CLASSES),
                                  np.full(shapes.NUM_CLASSES, N // shapes.NUM_CLASSES))
    np.testing.assert_array_equal(labels, np.arange(130, 130 + N) % shapes.NUM_CLASSES)
    assert len(shapes.CLASS_NAMES) == shapes.NUM_CLASSES >= 10


def test_float_images_are_the_uint8_images_in_minus_one_one():
    images_u8, labels_u8 = _batch(1, np.arange(N))
    images, labels = shapes.make_batch(1, np.arange(N), image_size=SIZE)
    images = np.asarray(images)
    assert images_u8.dtype == np.uint8 and images_u8.shape == (N, SIZE, SIZE, 3)
    assert images.dtype == np.float32 and images.min() >= -1.0 and images.max() <= 1.0
    np.testing.assert_allclose(images, images_u8 / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(shapes.to_uint8(images)), images_u8)
    np.testing.assert_array_equal(labels, labels_u8)
    # real content: each image spans a good part of the range (shape against background)
    spread = images_u8.reshape(N, -1).max(1).astype(int) - images_u8.reshape(N, -1).min(1)
    assert np.all(spread > 60)


def test_distinct_classes_render_distinct_shapes_with_the_same_random_draw():
    """Same key (position, size, colours, texture) for every class: the pictures must still differ by shape."""
    key = jax.random.key(7)
    renders = [np.asarray(_render(key, k, 64)) for k in range(shapes.NUM_CLASSES)]
    for a in range(shapes.NUM_CLASSES):
        for b in range(a + 1, shapes.NUM_CLASSES):
            changed = np.mean(np.abs(renders[a] - renders[b]).max(-1) > 0.15)
            assert changed > 0.01, (shapes.CLASS_NAMES[a], shapes.CLASS_NAMES[b], changed)


def test_images_vary_within_a_class():
    images, labels = _batch(0, np.arange(N))
    for k in range(shapes.NUM_CLASSES):
        same = images[labels == k].astype(float)
        assert np.mean(np.abs(same[0] - same[1])) > 10          # of 255: different place, colour, texture


def test_fine_detail_classes_have_more_edges_than_their_plain_twins():
    """striped_disk vs disk and checker vs square differ in fine structure, not only in outline (same keys, so
    background, colours and placement are identical and the extra edges come from the shape)."""
    def edges(label):
        total = 0.0
        for seed in range(4):
            img = np.asarray(_render(jax.random.key(seed), label, 64)).mean(-1)
            total += np.abs(np.diff(img, axis=0)).sum() + np.abs(np.diff(img, axis=1)).sum()
        return total
    names = shapes.CLASS_NAMES
    assert edges(names.index("striped_disk")) > 1.25 * edges(names.index("disk"))
    assert edges(names.index("checker")) > 1.25 * edges(names.index("square"))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="split"):
        shapes.make_batch(0, np.arange(4), split="validation")
    with pytest.raises(ValueError, match="1-D"):
        shapes.make_batch(0, np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="image_size"):
        shapes.make_batch(0, np.arange(4), image_size=4)


def test_batch_indices_depend_only_on_the_step():
    np.testing.assert_array_equal(np.asarray(shapes.batch_indices(3, 5)), np.arange(15, 20))


# --- shapes100: the research model's data ---------------------------------------------------------------------
def test_shapes100_classes_are_the_triples_and_balanced():
    from varq_jax.data import shapes100
    assert shapes100.NUM_CLASSES == 100 == len(set(shapes100.CLASS_NAMES))
    images, labels = shapes100.make_batch_uint8(0, np.arange(200), split="test", image_size=32)
    assert images.shape == (200, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(np.asarray(labels), minlength=100), 2)
    shape, texture, layout = shapes100.attributes(np.arange(100))
    assert {(s, t, l) for s, t, l in zip(shape, texture, layout)} == {(s, t, l) for s in range(10) for t in range(5)
                                                                       for l in range(2)}
    assert shapes100.CLASS_NAMES[57] == "pair_solid_rhombus" and shapes100.CLASS_NAMES[13] == "single_stripes_plus"


def test_shapes100_is_the_data_the_research_model_was_trained_on():
    """Per-image statistics pinned when the research VQVAE and classifier were trained: a change to the renderer
    would silently move the research model's real-data reference."""
    import json
    import os
    from varq_jax.data import shapes100
    pinned = json.load(open(os.path.join(os.path.dirname(__file__), "fixtures", "shapes100_stats.json")))
    images, _ = shapes100.make_batch_uint8(0, np.asarray(pinned["indices"]), split="test")
    x = np.asarray(images).astype(np.float64)
    np.testing.assert_allclose(x.mean((1, 2)), pinned["mean"], atol=0.5)
    np.testing.assert_allclose(x.std((1, 2)), pinned["std"], atol=0.5)


def test_shapes100_texture_and_layout_change_the_image():
    """Same random draw, one attribute changed: the image changes (each attribute is visible)."""
    from varq_jax.data import shapes100
    key = jax.random.key(3)
    render = jax.jit(lambda label: shapes100.render(key, label, 32))          # one compilation for every label
    base = np.asarray(render(0))                                  # single, solid, disk
    for other in (10, 20, 30, 40, 50, 1):                         # textures, pair layout, another shape
        assert np.abs(np.asarray(render(other)) - base).mean() > 0.01, other


def test_datasets_by_name():
    from varq_jax import data
    assert data.get("shapes100").NUM_CLASSES == 100 and data.get("shapes").NUM_CLASSES == 10
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; valid datasets: shapes, shapes100"):
        data.get("imagenet")
