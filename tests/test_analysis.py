"""Latent-space analysis library: PCA, clustering (K by BIC), traversals, maps, FSC, plots, report."""

from __future__ import annotations

import html.parser
import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryofire_ext.images import write_mrc
from cryofire_ext import analysis
from cryofire_ext.analysis import plots
from integrations import map_series, report
from cryofire_ext.errors import InputError
from cryofire_ext.metrics import clustering_error, pc1_correlation
from cryofire_ext.poses import random_rotations
from cryofire_ext.results import Predictions


def two_state_z(n=1000, d=8, seed=0, frac=0.3, sep=4.0):
    """Two anisotropic Gaussian states in d dims, centres `sep` (in units of the largest std) apart."""
    rng = np.random.default_rng(seed)
    state = (rng.random(n) < frac).astype(np.int64)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    scales = rng.uniform(0.3, 1.0, size=d)
    z = rng.normal(size=(n, d)) * scales + np.outer(state, direction) * sep * scales.max() * 2
    return z, state


def ten_state_z(n=2000, d=8, seed=1, noise=0.05):
    """Ten states on a curved 1D path through d dims (a conformational coordinate), plus noise."""
    rng = np.random.default_rng(seed)
    state = rng.integers(0, 10, n)
    t = state / 9.0
    basis = np.linalg.qr(rng.normal(size=(d, 3)))[0].T  # (3, d) orthonormal
    path = np.stack([3 * t, 0.8 * np.sin(np.pi * t), 0.3 * t ** 2], axis=1) @ basis
    return path + noise * rng.normal(size=(n, d)), state


# ---------------------------------------------------------------------------- PCA
def test_pca_finds_the_axis_of_largest_variance():
    rng = np.random.default_rng(3)
    axis = np.array([1.0, 2.0, -2.0, 0.0]) / 3.0
    z = np.outer(rng.normal(size=500) * 5, axis) + 0.2 * rng.normal(size=(500, 4)) + 7.0
    r = analysis.pca(z, 3)
    assert r.components.shape == (3, 4) and r.coords.shape == (500, 3)
    assert abs(r.components[0] @ axis) > 0.999
    assert r.explained_variance_ratio[0] > 0.95
    assert np.all(np.diff(r.explained_variance_ratio) <= 0)
    np.testing.assert_allclose(r.coords @ r.components + r.mean, z, atol=0.7)  # 3 of 4 PCs: near-exact
    assert analysis.pca(z, 10).components.shape == (4, 4)  # clipped to d


def test_traversal_spans_pc1_percentiles_through_the_mean():
    z, _ = ten_state_z(500)
    r = analysis.pca(z, 2)
    pts = analysis.pc_traversal(r, 0, n_steps=7)
    proj = (pts - r.mean) @ r.components.T
    lo, hi = np.percentile(r.coords[:, 0], [5, 95])
    np.testing.assert_allclose(proj[[0, -1], 0], [lo, hi], rtol=1e-6)
    np.testing.assert_allclose(proj[:, 1], 0, atol=1e-9)
    assert np.all(np.diff(proj[:, 0]) > 0)
    with pytest.raises(InputError, match="PC3"):
        analysis.pc_traversal(r, 2)


# --------------------------------------------------------------------- clustering
def test_polyline_points_are_evenly_spaced_along_the_path_through_its_vertices():
    v = np.array([[0.0, 0.0], [3.0, 0.0], [3.0, 0.0], [3.0, 1.0]])  # length 4, a repeated vertex
    p = analysis.polyline_points(v, 5)
    np.testing.assert_allclose(p, [[0, 0], [1, 0], [2, 0], [3, 0], [3, 1]], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(np.diff(p, axis=0), axis=1), 1.0)
    assert analysis.polyline_points(np.ones((2, 3)), 3).shape == (3, 3)  # length 0: the one point
    # the cluster path visits the centres in the order of their PC1 coordinate, from the lowest to the highest
    centres = np.array([[2.0, 0.0], [0.0, 0.0], [1.0, 5.0]])
    path = map_series.cluster_path_points(centres, pc1=np.array([2.0, 0.0, 1.0]), n_points=3)
    np.testing.assert_allclose(path, [[0, 0], [1, 5], [2, 0]])


def test_two_states_recovered_with_bic_chosen_k():
    z, state = two_state_z()
    k, bic = analysis.choose_k(z, k_max=6)
    assert k == 2, bic
    c = analysis.cluster(z)  # default: K by BIC, GMM labels
    assert c.k == 2 and c.k_source == "bic"
    assert clustering_error(c.labels, state) <= 0.01  # the bar
    assert clustering_error(c.kmeans_labels, state) <= 0.01
    assert np.bincount(c.labels)[0] >= np.bincount(c.labels)[1]  # cluster 1 = the largest
    # the on-data centre of each cluster is a member of it
    assert np.all(c.labels[c.centre_particles] == np.arange(c.k))


def test_ten_states_follow_pc1():
    z, state = ten_state_z()
    r = analysis.pca(z, 2)
    corr = abs(np.corrcoef(r.coords[:, 0], state)[0, 1])
    assert corr == pytest.approx(pc1_correlation(z, state))  # the library's PCA is the metric's
    print(f"ten-state synthetic |corr(PC1, state)| = {corr:.3f}")
    assert corr > 0.95
    c = analysis.cluster(z, 10, method="kmeans")
    assert clustering_error(c.labels, state) < 0.05


def test_clustering_does_not_depend_on_the_units_of_z():
    """A barely trained model's z spreads ~1e-5: K and labels must be those of the same z in other units."""
    z, state = two_state_z(n=300)
    big, tiny = analysis.cluster(z), analysis.cluster(z * 1e-5 + 0.07)
    assert big.k == tiny.k == 2
    np.testing.assert_array_equal(big.labels, tiny.labels)
    np.testing.assert_allclose(tiny.centres, big.centres * 1e-5 + 0.07, rtol=1e-6, atol=1e-12)
    assert clustering_error(tiny.labels, state) <= 0.01


def test_a_user_k_gives_k_non_empty_clusters_when_the_mixture_nests(monkeypatch):
    """On unstructured z a K=2 mixture can nest a tiny component inside a broad one that labels nobody
    (seen on a poorly trained run's z: weights 0.008 / 0.992, populations 0 / 2000). The user asked for
    K clusters, so the k-means labels are used and `method` says so."""

    class Nested:  # what GaussianMixture returned there: every particle in one component
        means_ = np.zeros((2, 2))

        def predict(self, z):
            return np.ones(len(z), dtype=np.int64)

        def bic(self, z):
            return 0.0

    from cryofire_ext.analysis import latent

    monkeypatch.setattr(latent, "_gmm", lambda z, k, seed, n_init=2: Nested())  # where cluster() looks it up
    z, state = two_state_z(n=300, d=2)
    c = analysis.cluster(z, 2)
    assert c.method == "kmeans" and np.all(c.populations() > 0)
    assert clustering_error(c.labels, state) <= 0.01


def test_k_is_checked_and_user_k_kept():
    z, _ = two_state_z(n=50)
    with pytest.raises(InputError, match="number of particles"):
        analysis.cluster(z, 51)
    with pytest.raises(InputError):
        analysis.cluster(z, 0)
    with pytest.raises(InputError, match="zdim 0"):
        analysis.cluster(np.zeros((10, 0)), 2)
    c = analysis.cluster(z, 3, method="kmeans")
    assert c.k == 3 and c.k_source == "user" and c.method == "kmeans"


def test_cluster_numbers_are_one_based():
    assert analysis.parse_cluster_numbers("1,3", 3) == [0, 2]
    assert analysis.parse_cluster_numbers(" 2 ", 2) == [1]
    for bad in ("0", "4", "a,b", ""):
        with pytest.raises(InputError):
            analysis.parse_cluster_numbers(bad, 3)
    labels = np.array([0, 2, 1, 2, 0])
    np.testing.assert_array_equal(analysis.cluster_members(labels, [0, 2]), [0, 1, 3, 4])


def test_clustering_save_load_round_trip(tmp_path):
    z, _ = two_state_z(n=200)
    c = analysis.cluster(z, 2)
    ids = np.array([f"{i + 1}@s.mrcs" for i in range(200)])
    npz, js = analysis.save_clustering(c, ids, tmp_path)
    c2, ids2 = analysis.load_clustering(npz)
    np.testing.assert_array_equal(c2.labels, c.labels)
    np.testing.assert_allclose(c2.centres, c.centres)
    np.testing.assert_array_equal(ids2, ids)
    assert c2.k == 2 and c2.method == "gmm"
    with pytest.raises(InputError, match="exists"):
        analysis.save_clustering(c, ids, tmp_path)
    with pytest.raises(InputError, match="cryofire analyze"):
        analysis.load_clustering(tmp_path / "nothing.npz")


# --------------------------------------------------------------------- maps / FSC
def test_map_fsc_is_one_for_equal_maps_and_low_for_independent_noise():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(24, 24, 24))
    freq, f = analysis.map_fsc(a, a, 2.0)
    assert np.allclose(f[1:], 1.0, atol=1e-6)
    assert freq[-1] < 1 / (2 * 2.0) + 1e-9  # up to Nyquist
    _, f2 = analysis.map_fsc(a, rng.normal(size=a.shape), 2.0)
    assert np.abs(f2[2:]).mean() < 0.1


def test_write_mrc_keeps_voxel_size_and_refuses_overwrite(tmp_path):
    vol = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    p = write_mrc(tmp_path / "m.mrc", vol, 3.5)
    with mrcfile.open(p) as m:
        np.testing.assert_allclose(m.voxel_size.x, 3.5)
        np.testing.assert_array_equal(m.data, vol)
    with pytest.raises(InputError, match="exists"):
        write_mrc(p, vol, 3.5)


def test_read_z_points_checks_dimension(tmp_path):
    np.testing.assert_allclose(analysis.read_z_points("0.1,0.2; 0.3 0.4", zdim=2), [[0.1, 0.2], [0.3, 0.4]])
    with pytest.raises(InputError, match="dimension 3"):
        analysis.read_z_points("0.1,0.2", zdim=3)
    f = tmp_path / "z.txt"
    np.savetxt(f, np.zeros((4, 5)))
    with pytest.raises(InputError, match=r"z.txt.*5 values.*dimension 8"):
        analysis.read_z_points(path=f, zdim=8)
    np.save(tmp_path / "z.npy", np.ones((2, 8)))
    assert analysis.read_z_points(path=tmp_path / "z.npy", zdim=8).shape == (2, 8)
    with pytest.raises(InputError, match="exactly one"):
        analysis.read_z_points("1", tmp_path / "z.npy")
    with pytest.raises(InputError, match="finite"):
        analysis.read_z_points("0.1,nan", zdim=2)


def test_z_points_outside_the_particles_range_are_warned_of(caplog):
    data_z = np.array([[0.1], [0.5], [0.9]])
    with caplog.at_level("WARNING"):
        analysis.read_z_points("0.2;0.8", zdim=1, data_z=data_z)
    assert "outside" not in caplog.text
    with caplog.at_level("WARNING"):
        z = analysis.read_z_points("0.2;1.5;-3", zdim=1, data_z=data_z)
    assert z.shape == (3, 1)
    assert "2 of 3 latent point(s) lie outside the particles' z range (0.1) to (0.9), e.g. point 2 (1.5)" \
        in caplog.text


# ---------------------------------------------------------------------------- plots
def _assert_png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(path)[..., :3]
    assert img.shape[:2] == (plots.HEIGHT_PX, plots.WIDTH_PX)
    non_white = np.mean(np.any(img < 0.95, axis=-1))
    assert non_white > 0.02, f"{path.name}: almost blank ({non_white:.3f} of pixels drawn)"
    return img


def _colour_fraction(img: np.ndarray, rgb) -> float:
    return float(np.mean(np.all(np.abs(img - np.asarray(rgb)) < 0.02, axis=-1)))


def test_plots_are_pngs_of_the_stated_size_that_show_their_data(tmp_path):
    from matplotlib import colormaps
    from matplotlib.colors import to_rgb

    rng = np.random.default_rng(0)
    z, state = two_state_z(n=400)
    xy = analysis.pca(z, 2).coords
    tab = colormaps["tab10"]
    p = plots.latent_scatter(xy, state, tmp_path / "s.png")
    img = _assert_png(p)
    # both clusters' colours are drawn (points at alpha 0.6 over white)
    on_white = [0.6 * np.asarray(tab(j)[:3]) + 0.4 for j in (0, 1)]
    assert _colour_fraction(img, on_white[0]) > 1e-3 and _colour_fraction(img, on_white[1]) > 3e-4
    _assert_png(plots.latent_density(xy, tmp_path / "d.png"))
    img = _assert_png(plots.cluster_populations(np.array([300, 100]), tmp_path / "p.png"))
    # the bar of cluster 1 (colour 0) is 3x as tall as that of cluster 2: about 3x the pixels
    ratio = _colour_fraction(img, tab(0)[:3]) / _colour_fraction(img, tab(1)[:3])
    assert 2.5 < ratio < 3.5, ratio
    img = _assert_png(plots.loss_curve(np.arange(1, 21), np.exp(-np.arange(20) / 5.0), tmp_path / "l.png"))
    rows, cols = np.nonzero(np.all(np.abs(img - np.asarray(to_rgb("C0"))) < 0.02, axis=-1))
    assert len(rows) > 300 and cols.max() - cols.min() > 0.5 * img.shape[1]
    assert rows[cols < cols.min() + 20].mean() < rows[cols > cols.max() - 20].mean()  # drawn falling
    A = random_rotations(500, rng)
    _assert_png(plots.viewing_directions(A, tmp_path / "v.png"))
    _assert_png(plots.inplane_and_shifts(rng.uniform(-180, 180, 500), rng.normal(size=(500, 2)), tmp_path / "i.png"))
    freq = np.linspace(0, 0.25, 16)
    _assert_png(plots.fsc_between_maps(freq, {(0, 1): np.linspace(1, 0, 16), (0, 2): np.linspace(1, 0.3, 16),
                                              (1, 2): np.ones(16)}, tmp_path / "f.png"))
    with pytest.raises(InputError, match="exists"):
        plots.latent_density(xy, tmp_path / "d.png")


def test_viewing_direction_plot_shows_where_the_views_are(tmp_path):
    """Views all near the north pole (tilt ~ 0) fill only the top of the Mollweide map."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(1)
    At = Rotation.from_euler("ZYZ", np.c_[rng.uniform(0, 360, 300), rng.uniform(0, 10, 300),
                                          rng.uniform(0, 360, 300)], degrees=True).as_matrix()
    img = _assert_png(plots.viewing_directions(np.swapaxes(At, 1, 2), tmp_path / "v.png"))
    coloured = np.abs(img - img.mean(axis=-1, keepdims=True)).sum(-1) > 0.15  # viridis bins, not grey/white
    rows = np.nonzero(coloured[: int(0.8 * img.shape[0])].any(axis=1))[0]  # above the colour bar
    top, bottom = rows.min(), rows.max()
    assert bottom < 0.35 * img.shape[0], (top, bottom)


def _panel_brightness(img: np.ndarray) -> np.ndarray:
    """Mean grey of each column of panels of a montage: the runs of columns, wider than half a panel, that
    are not white from top to bottom (the panels' black background; the row labels are narrower)."""
    grey = img[..., :3].mean(-1)
    drawn = np.concatenate([[False], (grey < 0.9).any(axis=0), [False]])
    starts, ends = np.nonzero(np.diff(drawn.astype(int)) == 1)[0], np.nonzero(np.diff(drawn.astype(int)) == -1)[0]
    runs = [(a, b) for a, b in zip(starts, ends) if b - a > 0.5 * plots.MONTAGE_PANEL_IN * plots.DPI]
    return np.array([grey[:, a:b].mean() for a, b in runs])


def test_map_montage_draws_each_series_on_one_grey_scale_per_row(tmp_path):
    from matplotlib.image import imread

    truth = blob_maps(24)
    t = np.linspace(0, 1, 6)[:, None, None, None]
    series = truth[0][None] * (1 - t) + truth[1][None] * t  # state 1 -> state 2
    a = plots.map_montage(series, tmp_path / "a.png", title="PC1 traversal")
    assert a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img_a = imread(a)[..., :3]
    # the picture grows by one panel per map; its height does not change
    img_3 = imread(plots.map_montage(series[:3], tmp_path / "three.png", title="PC1 traversal"))[..., :3]
    assert img_3.shape[0] == img_a.shape[0] and img_a.shape[1] - img_3.shape[1] == round(
        3 * plots.MONTAGE_PANEL_IN * plots.DPI)
    # another series draws other pixels (the reverse path), the same series the same pixels
    img_b = imread(plots.map_montage(series[::-1], tmp_path / "b.png", title="PC1 traversal"))[..., :3]
    assert img_b.shape == img_a.shape and np.abs(img_a - img_b).mean() > 0.01
    again = plots.map_montage(series, tmp_path / "a2.png", title="PC1 traversal")
    np.testing.assert_array_equal(imread(again)[..., :3], img_a)
    # one grey scale per row: a map that only gets denser gets brighter from panel to panel
    # (each panel on its own scale would draw four identical panels)
    rising = truth[0][None] * np.arange(1, 5)[:, None, None, None]
    bright = _panel_brightness(imread(plots.map_montage(rising, tmp_path / "r.png")))
    assert len(bright) == 4 and np.all(np.diff(bright) > 0.01), bright
    with pytest.raises(InputError, match="exists"):
        plots.map_montage(series, a)
    with pytest.raises(ValueError, match="D, D, D"):
        plots.map_montage(series[0], tmp_path / "bad.png")


def _cxc_commands(path: Path) -> list[list[str]]:
    """The command lines of a ChimeraX .cxc (comment lines start with '#'), split into words."""
    return [line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_chimerax_file_opens_the_series_in_order_from_its_own_folder(tmp_path):
    maps = [write_mrc(tmp_path / "maps" / "pc1_traversal" / f"step_{i:02d}.mrc", v, 4.0)
            for i, v in enumerate(blob_maps(16), start=1)]
    views = map_series.series_views(maps, tmp_path / "plots" / "pc1.png", tmp_path / "maps" / "pc1.cxc",
                                   title="PC1", run_from=tmp_path)
    text = views.chimerax.read_text()
    assert "chimerax maps/pc1.cxc" in text and "vseries play #1" in text
    opened, vol = _cxc_commands(views.chimerax)
    assert opened == ["open", "pc1_traversal/step_01.mrc", "pc1_traversal/step_02.mrc", "vseries", "true"]
    assert [(views.chimerax.parent / p).resolve() for p in opened[1:-2]] == [m.resolve() for m in maps]
    assert vol[:5] == ["volume", "#1", "style", "surface", "level"]
    assert float(vol[5]) == pytest.approx(map_series.LEVEL_FRACTION * max(float(v.max()) for v in blob_maps(16)),
                                          rel=1e-5) == pytest.approx(views.level, rel=1e-5)
    # refuses to overwrite the montage or the .cxc unless forced
    with pytest.raises(InputError, match="exists"):
        map_series.series_views(maps[::-1], tmp_path / "plots" / "other.png", views.chimerax)
    with pytest.raises(InputError, match="exists"):
        map_series.series_views(maps[::-1], views.picture, tmp_path / "maps" / "other.cxc")
    assert _cxc_commands(views.chimerax)[0] == opened
    map_series.series_views(maps[::-1], views.picture, views.chimerax, force=True)
    assert _cxc_commands(views.chimerax)[0][1:3] == opened[2:0:-1]


# --------------------------------------------------------------------- end to end
class BlendSource:
    """Fake trained model: two truth maps blended by where z lies between two state centres."""

    def __init__(self, truth: np.ndarray, centres: np.ndarray, pixel_size_A: float = 4.0):
        self.truth, self.centres, self.pixel_size_A = truth, centres, pixel_size_A
        self.zdim = centres.shape[1]

    def volumes(self, z):
        u = self.centres[1] - self.centres[0]
        t = (np.asarray(z) - self.centres[0]) @ u / (u @ u)
        w = 1 / (1 + np.exp(-10 * (t - 0.5)))
        return (self.truth[0][None] * (1 - w)[:, None, None, None] + self.truth[1][None] * w[:, None, None, None]
                ).astype(np.float32)


def blob_maps(D=24):
    g = np.arange(D) - D // 2

    def blob(c, s):
        return np.exp(-((g[:, None, None] - c[0]) ** 2 + (g[None, :, None] - c[1]) ** 2
                        + (g[None, None, :] - c[2]) ** 2) / s)

    core = blob((0, 0, 0), 20)
    return np.stack([core + blob((6, 0, 0), 8), core + blob((0, -6, 3), 8)]).astype(np.float32)


def make_run(path: Path, n=400, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A run folder with predictions.npz for a two-state z; returns (state (n,), state centres (2, d))."""
    rng = np.random.default_rng(seed)
    z, state = two_state_z(n=n, seed=seed)
    centres = np.stack([z[state == s].mean(0) for s in (0, 1)])
    path.mkdir(parents=True, exist_ok=True)
    Predictions(ids=[f"{i + 1:06d}@stack.mrcs" for i in range(n)], A=random_rotations(n, rng),
                shifts_A=rng.normal(size=(n, 2)), z=z, loss=rng.random(n),
                meta={"pixel_size_A": 4.0, "box": 24}).save(path / "predictions.npz")
    return state, centres


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("href", "src")]


def test_analyze_run_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "umap", None)  # as if umap-learn were not installed
    state, centres = make_run(tmp_path / "run")
    truth = blob_maps()
    written = []
    hist = [{"epoch": i // 4, "batch": i % 4, "images": 32 * (i + 1), "loss": float(np.exp(-i / 10))}
            for i in range(40)]
    (tmp_path / "run" / "history.json").write_text(json.dumps(hist))  # the trainer's loss records

    def writer(rows, stem, force):
        p = stem.with_suffix(".txt")
        p.parent.mkdir(parents=True, exist_ok=True)
        np.savetxt(p, rows, fmt="%d")
        written.append(rows)
        return [p]

    res = report.analyze_run(tmp_path / "run", tmp_path / "an", report.AnalyzeConfig(traversal_steps=4),
                             source=BlendSource(truth, centres), subset_writer=writer)
    assert res.clustering.k == 2 and clustering_error(res.clustering.labels, state) <= 0.01
    # each cluster map correlates best with its own state's truth map
    for j, path in enumerate(res.cluster_maps):
        with mrcfile.open(path) as m:
            vol = m.data.copy()
            assert m.voxel_size.x == pytest.approx(4.0)
        own = np.bincount(state[res.clustering.labels == j]).argmax()
        corr = [np.corrcoef(vol.ravel(), t.ravel())[0, 1] for t in truth]
        assert np.argmax(corr) == own
    assert len(res.traversal_maps[1]) == 4 and len(res.traversal_maps[2]) == 4
    assert res.plots["Training loss"].name == "loss.png"
    x, loss, xlabel = analysis.load_run(tmp_path / "run").loss_history
    assert xlabel == "images seen" and x[-1] == 1280 and loss[0] == 1.0
    # subsets: one per cluster, the clusters' members, together every particle once
    assert len(written) == 2 and sorted(np.concatenate(written).tolist()) == list(range(len(state)))
    # every link of the report resolves to a file in the folder
    parser = _Links()
    parser.feed(res.report.read_text())
    assert len(parser.links) >= 6 + 2 + 8 + 2
    for link in parser.links:
        assert (res.report.parent / link).is_file(), link
    assert "cluster_01.mrc" in res.report.read_text()
    assert 'UMAP skipped: the optional umap-learn package is not installed; pip install "cryofire-ext[umap]"' in \
        html.unescape(res.report.read_text())
    # each series along the landscape: its montage and its ChimeraX file, linked from the report
    from matplotlib.image import imread

    assert set(res.map_views) == {"pc1_traversal", "pc2_traversal", "cluster_path"}
    for name, views in res.map_views.items():
        assert views.picture == tmp_path / "an" / "plots" / f"{name}.png"
        assert views.chimerax == tmp_path / "an" / "maps" / f"{name}.cxc"
        assert imread(views.picture).shape[1] == imread(res.map_views["pc1_traversal"].picture).shape[1]  # 4 maps
        opened = _cxc_commands(views.chimerax)[0]
        assert opened[-2:] == ["vseries", "true"]
        assert [views.chimerax.parent / p for p in opened[1:-2]] == views.maps == sorted(
            (tmp_path / "an" / "maps" / name).glob("step_*.mrc"))
        assert {f"plots/{name}.png", f"maps/{name}.cxc"} <= set(parser.links)
    assert res.map_views["pc1_traversal"].maps == res.traversal_maps[1]
    # the path through the cluster centres starts and ends at the cluster maps' points
    path = map_series.read_maps(res.map_views["cluster_path"].maps)
    ends = map_series.read_maps(res.cluster_maps)
    assert len(path) == 4 and {tuple(np.round([np.abs(path[i] - e).max() for e in ends], 4) == 0) for i in (0, -1)} \
        == {(True, False), (False, True)}
    summary = json.loads((tmp_path / "an" / "summary.json").read_text())
    assert summary["map_views"]["pc2_traversal"]["chimerax"] == "maps/pc2_traversal.cxc"
    # refuses to overwrite an analysis unless forced, also where only the new pictures and .cxc files are left
    with pytest.raises(InputError, match="exists"):
        report.analyze_run(tmp_path / "run", tmp_path / "an", source=BlendSource(truth, centres))
    before = res.map_views["pc1_traversal"].chimerax.read_text()
    for left in ((".png", ".cxc"), (".cxc",)):
        new_views = {v.picture for v in res.map_views.values()} | {v.chimerax for v in res.map_views.values()}
        for p in (tmp_path / "an").rglob("*"):
            if p.is_file() and (p not in new_views or p.suffix not in left):
                p.unlink()
        with pytest.raises(InputError, match=rf"pc1_traversal\{left[0]}: the output exists"):
            report.analyze_run(tmp_path / "run", tmp_path / "an", report.AnalyzeConfig(traversal_steps=3),
                               source=BlendSource(truth, centres))
        assert res.map_views["pc1_traversal"].chimerax.read_text() == before
    report.analyze_run(tmp_path / "run", tmp_path / "an", report.AnalyzeConfig(n_clusters=3, maps=False),
                       force=True)


def test_analyze_run_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no predictions.npz"):
        report.analyze_run(tmp_path / "empty")
    make_run(tmp_path / "run", n=30)
    with pytest.raises(InputError, match="larger than the number of particles"):
        report.analyze_run(tmp_path / "run", config=report.AnalyzeConfig(n_clusters=31, maps=False))
