"""`cryofire analyze / eval-vol / select` end to end on a run folder with a real RELION particles.star."""

from __future__ import annotations

import json

import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cli.main import main
from cryofire_ext import analysis
from cryofire_ext.poses import matrix_to_relion_euler, random_rotations
from cryofire_ext.results import Predictions
from tests.conftest import require_relion
from tests.test_analysis import BlendSource, blob_maps, clustering_error

PIXEL_A = 4.0


def _state_table(s: int, n: int, D: int, rng, stack: str) -> pd.DataFrame:
    e = matrix_to_relion_euler(random_rotations(n, rng))
    df = rng.uniform(8000, 20000, n)
    return pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@{stack}" for i in range(n)], "rlnAngleRot": e[:, 0],
                         "rlnAngleTilt": e[:, 1], "rlnAnglePsi": e[:, 2], "rlnOriginXAngst": 0.0,
                         "rlnOriginYAngst": 0.0, "rlnDefocusU": df, "rlnDefocusV": df, "rlnDefocusAngle": 0.0,
                         "rlnOpticsGroup": 1})


def make_star_run(root: Path, D: int = 32, n=(120, 80), relion: bool = False, seed: int = 0):
    """A run folder: two states' particles (RELION-projected truth maps when `relion`, else random images)
    in particles.star with extra columns every subset must keep, and predictions.npz whose z separates
    the states. Returns (run dir, state `(n,)` in predictions order, truth maps `(2, D, D, D)`)."""
    rng = np.random.default_rng(seed)
    run = root / "run"
    run.mkdir(parents=True)
    truth = blob_maps(D)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [PIXEL_A], "rlnImageSize": [D], "rlnImageDimensionality": [2]})
    tables = []
    for s, count in enumerate(n):
        table = _state_table(s, count, D, rng, f"proj{s}.mrcs")
        if relion:
            with mrcfile.new(root / f"truth{s}.mrc") as m:
                m.set_data(truth[s])
                m.voxel_size = PIXEL_A
            starfile.write({"optics": optics, "particles": table}, root / f"in{s}.star")
            subprocess.run(["relion_project", "--i", str(root / f"truth{s}.mrc"), "--o", str(run / f"proj{s}"),
                            "--ang", str(root / f"in{s}.star"), "--ctf", "--angpix", str(PIXEL_A)],
                           check=True, capture_output=True)
        else:
            with mrcfile.new(run / f"proj{s}.mrcs") as m:
                m.set_data(rng.normal(size=(count, D, D)).astype(np.float32))
        table["rlnMicrographName"] = f"Micrographs/state{s}.mrc"
        table["rlnCoordinateX"] = rng.uniform(0, 4000, count).round(1)
        tables.append(table)
    particles = pd.concat(tables, ignore_index=True)
    state = np.repeat(np.arange(len(n)), n)
    order = rng.permutation(len(particles))
    particles, state = particles.iloc[order].reset_index(drop=True), state[order]
    particles["rlnRandomSubset"] = 1 + np.arange(len(particles)) % 2
    starfile.write({"optics": optics, "particles": particles}, run / "particles.star")
    from integrations.relion import read_star

    stack = read_star(run / "particles.star")
    z = rng.normal(size=(len(state), 4)) * 0.5 + np.outer(state, [3.0, -2.0, 0.0, 1.0])
    Predictions(ids=stack.ids, A=stack.A, shifts_A=stack.shifts_A, z=z, loss=rng.random(len(state)),
                meta={"pixel_size_A": PIXEL_A, "box": D}).save(run / "predictions.npz")
    return run, state, truth


@pytest.fixture
def star_run(tmp_path):
    return make_star_run(tmp_path)


def test_analyze_writes_clusters_report_and_one_star_subset_per_cluster(star_run, capsys):
    run, state, _ = star_run
    assert main(["analyze", str(run), "--no-maps"]) == 0
    out = run / "analysis"
    assert "clusters (1-based): 1: 120, 2: 80" in capsys.readouterr().out
    clus, ids = analysis.load_clustering(out / "clusters.npz")
    assert clus.k == 2 and clustering_error(clus.labels, state) <= 0.01
    original = starfile.read(run / "particles.star")["particles"]
    for j in range(2):
        sub = starfile.read(out / "subsets" / f"cluster_{j + 1:02d}.star")
        assert set(sub) == {"optics", "particles"}
        p = sub["particles"]
        members = np.nonzero(clus.labels == j)[0]
        assert len(p) == len(members)
        # every input column is kept, for exactly the cluster's particles, plus the latent coordinates
        assert set(original.columns) <= set(p.columns) and {"cryofireZ1", "cryofireZ4"} <= set(p.columns)
        assert p["rlnMicrographName"].nunique() == 1  # a cluster is one state
        np.testing.assert_allclose(np.sort(p["rlnCoordinateX"]),
                                   np.sort(original["rlnCoordinateX"].to_numpy()[members]))
        np.testing.assert_array_equal(np.sort(p["rlnRandomSubset"].unique()), [1, 2])
        assert p["rlnRandomSubset"].dtype.kind == "i"
    # the subset's images resolve from where it lies (RELION reads it from there)
    from integrations.relion import read_star

    sub_stack = read_star(out / "subsets" / "cluster_01.star", require_images=True)
    assert len(sub_stack) == int((clus.labels == 0).sum())
    assert main(["analyze", str(run), "--no-maps"]) == 2  # refuses to overwrite
    assert main(["analyze", str(run), "--no-maps", "--clusters", "3", "--force", "--method", "kmeans"]) == 0
    assert analysis.load_clustering(out / "clusters.npz")[0].k == 3


def test_select_writes_star_and_cs_subsets_with_one_based_clusters(star_run, tmp_path, capsys):
    run, state, _ = star_run
    assert main(["select", str(run), "--clusters", "1", "-o", str(tmp_path / "x.star")]) == 2  # not analysed yet
    assert "cryofire analyze" in capsys.readouterr().err
    assert main(["analyze", str(run), "--no-maps", "--no-subsets"]) == 0
    clus, _ = analysis.load_clustering(run / "analysis" / "clusters.npz")
    pred = Predictions.load(run / "predictions.npz")
    assert main(["select", str(run), "--clusters", "2", "-o", str(tmp_path / "c2.star")]) == 0
    p = starfile.read(tmp_path / "c2.star")["particles"]
    assert len(p) == int((clus.labels == 1).sum())  # "2" is 1-based: label 1
    np.testing.assert_allclose(np.sort(p["cryofireZ1"]), np.sort(pred.z[clus.labels == 1, 0]), rtol=1e-5)
    assert main(["select", str(run), "--clusters", "1,2", "-o", str(tmp_path / "all.cs")]) == 0
    from integrations.cryosparc import read_cs

    cs = read_cs(tmp_path / "all.cs")
    assert len(cs) == len(pred)
    np.testing.assert_allclose(cs.A, pred.A, atol=1e-5)  # select keeps the run's particle order
    fields = set(np.load(tmp_path / "all.cs").dtype.names)
    assert {"components_mode_0/value", "components_mode_3/value", "alignments3D/pose"} <= fields
    assert main(["select", str(run), "--clusters", "3", "-o", str(tmp_path / "bad.star")]) == 2
    assert "numbered 1..2" in capsys.readouterr().err
    assert main(["select", str(run), "--clusters", "1", "-o", str(tmp_path / "bad.txt")]) == 2


def test_bad_input_exits_2_with_a_clear_message(star_run, tmp_path, capsys):
    run, _, _ = star_run
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert main(["analyze", str(empty)]) == 2
    assert "no predictions.npz" in capsys.readouterr().err
    assert main(["analyze", str(run), "--no-maps", "--clusters", "201"]) == 2
    assert "larger than the number of particles" in capsys.readouterr().err
    zf = tmp_path / "z.txt"
    np.savetxt(zf, np.zeros((2, 3)))
    assert main(["eval-vol", str(run), "--z-file", str(zf), "-o", str(tmp_path / "vols")]) == 2
    err = capsys.readouterr().err
    assert "z.txt" in err and "dimension 4" in err
    assert main(["eval-vol", str(run), "--z", "1,2", "-o", str(tmp_path / "vols")]) == 2
    assert main(["eval-vol", str(empty), "-o", str(tmp_path / "vols")]) == 2


def test_eval_vol_writes_maps_at_the_given_points(star_run, tmp_path, monkeypatch):
    run, state, truth = star_run
    pred = Predictions.load(run / "predictions.npz")
    centres = np.stack([pred.z[state == s].mean(0) for s in (0, 1)])
    monkeypatch.setattr(analysis, "load_volume_source", lambda run_dir, device="cpu": BlendSource(truth, centres))
    z_text = ";".join(",".join(f"{v:.4f}" for v in c) for c in centres)
    assert main(["eval-vol", str(run), "--z", z_text, "-o", str(tmp_path / "vols")]) == 0
    for s in (0, 1):
        with mrcfile.open(tmp_path / "vols" / f"vol_{s + 1:03d}.mrc") as m:
            assert m.voxel_size.x == pytest.approx(PIXEL_A)
            corr = [np.corrcoef(m.data.ravel(), t.ravel())[0, 1] for t in truth]
        assert np.argmax(corr) == s


def _corr(path: Path, ref: np.ndarray, lowpass: float | None = None) -> float:
    """Correlation of a map file with `ref`, both low-passed to `lowpass` x Nyquist when given (a sharp
    spherical filter: compares the conformations, not the noise of a smaller subset)."""
    with mrcfile.open(path) as m:
        vol = m.data.astype(np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if lowpass is not None:
        k = np.fft.fftfreq(vol.shape[0]) * 2
        keep = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2) <= lowpass
        vol, ref = (np.fft.ifftn(np.fft.fftn(v) * keep).real for v in (vol, ref))
    return float(np.corrcoef(vol.ravel(), ref.ravel())[0, 1])


@pytest.mark.relion
def test_cluster_subset_star_feeds_relion_reconstruct_and_is_closer_to_its_state(tmp_path):
    require_relion("relion_reconstruct", "relion_project")
    run, state, truth = make_star_run(tmp_path, D=32, n=(150, 100), relion=True)
    assert main(["analyze", str(run), "--no-maps"]) == 0
    clus, _ = analysis.load_clustering(run / "analysis" / "clusters.npz")
    assert clustering_error(clus.labels, state) <= 0.01
    sub = run / "analysis" / "subsets" / "cluster_02.star"
    own = int(np.bincount(state[clus.labels == 1]).argmax())
    # RELION resolves image paths from its project directory: the run folder, where particles.star's resolve
    for star, mrc in ((sub, tmp_path / "sub.mrc"), (run / "particles.star", tmp_path / "full.mrc")):
        subprocess.run(["relion_reconstruct", "--i", str(star), "--o", str(mrc), "--ctf", "--angpix", str(PIXEL_A)],
                       check=True, capture_output=True, cwd=run)
    c_sub, c_full = _corr(tmp_path / "sub.mrc", truth[own]), _corr(tmp_path / "full.mrc", truth[own])
    print(f"corr with state {own + 1} truth: cluster-2 subset {c_sub:.3f}, full set {c_full:.3f}")
    assert c_sub > c_full + 0.02 and c_sub > 0.8


def simulated_run(root: Path, n: int = 240, snr: float = 1.0) -> tuple[Path, np.ndarray, np.ndarray]:
    """`cryofire simulate --phantom` (two states, .mrcs + STAR + .cs + truth.npz) made into a run folder:
    predictions.npz with the true poses and a z that separates the states (no training: this checks the
    analysis and export path, not the model). Returns (run dir, state `(n,)`, truth maps `(2, D, D, D)`)."""
    from integrations.relion import read_star
    from integrations.simulated import load_truth

    run = root / "sim"
    assert main(["simulate", "--phantom", "-n", str(n), "--snr", str(snr), "--mix", "0.6,0.4", "-o", str(run)]) == 0
    truth = load_truth(run / "truth.npz")
    maps = []
    for name in truth["map_files"]:
        with mrcfile.open(run / str(name)) as m:
            maps.append(m.data.copy())
    stack = read_star(run / "particles.star")
    state = truth["state"].astype(np.int64)
    rng = np.random.default_rng(5)
    z = rng.normal(size=(n, 3)) * 0.4 + np.outer(state, [2.0, 1.0, -1.0])
    Predictions(ids=stack.ids, A=truth["A"], shifts_A=truth["shifts_A"], z=z, loss=np.zeros(n),
                meta={"pixel_size_A": float(truth["pixel_size_A"])}).save(run / "predictions.npz")
    return run, state, np.stack(maps)


@pytest.mark.relion
def test_simulated_two_state_subsets_in_both_formats_and_relion_reconstruct(tmp_path):
    require_relion("relion_reconstruct")
    run, state, maps = simulated_run(tmp_path)
    assert main(["analyze", str(run), "--no-maps"]) == 0
    clus, _ = analysis.load_clustering(run / "analysis" / "clusters.npz")
    assert clus.k == 2 and clustering_error(clus.labels, state) <= 0.01
    from integrations.cryosparc import read_cs

    full_cs = np.load(run / "particles.cs")
    for j in range(2):
        members = np.nonzero(clus.labels == j)[0]
        cs = np.load(run / "analysis" / "subsets" / f"cluster_{j + 1:02d}.cs")
        np.testing.assert_array_equal(cs["uid"], full_cs["uid"][members])  # the same particles, every field
        assert set(full_cs.dtype.names) <= set(cs.dtype.names)
        assert len(read_cs(run / "analysis" / "subsets" / f"cluster_{j + 1:02d}.cs")) == len(members)
    apix = float(np.load(run / "truth.npz")["pixel_size_A"])
    sub = run / "analysis" / "subsets" / "cluster_02.star"
    own = int(np.bincount(state[clus.labels == 1]).argmax())
    for star, mrc in ((sub, tmp_path / "sub.mrc"), (run / "particles.star", tmp_path / "full.mrc")):
        subprocess.run(["relion_reconstruct", "--i", str(star), "--o", str(mrc), "--ctf", "--angpix", str(apix)],
                       check=True, capture_output=True, cwd=run)
    c_sub, c_full = (_corr(tmp_path / f, maps[own], lowpass=0.5) for f in ("sub.mrc", "full.mrc"))
    c_other = _corr(tmp_path / "sub.mrc", maps[1 - own], lowpass=0.5)
    print(f"simulated phantom: corr with state {own + 1} truth: cluster-2 subset {c_sub:.3f}, full set {c_full:.3f}; "
          f"subset with the other state {c_other:.3f}")
    assert c_sub > c_full + 0.01 and c_sub > c_other + 0.01


def test_backprojected_cluster_maps_match_their_own_state(tmp_path):
    """Each cluster's map back-projected from its particles (at the run's poses, here the true ones)
    correlates best with its own state's truth and better than the full set's map does."""
    from cli.analyze import member_map_for_run
    from integrations import report
    from cryofire_ext.recon.reconstruct import reconstruct
    from integrations.relion import read_star

    run, state, maps = simulated_run(tmp_path, n=300, snr=3.0)
    pred = Predictions.load(run / "predictions.npz")
    src = BlendSource(maps, np.array([[0.0, 0.0, 0.0], [2.0, 1.0, -1.0]]), pixel_size_A=6.0)
    res = report.analyze_run(run, None, report.AnalyzeConfig(n_clusters=2, n_pcs=1, traversal_steps=2, umap=False),
                             source=src, member_map=member_map_for_run(run, pred))
    assert [p.name for p in res.backprojected_maps] == ["cluster_01_backprojected.mrc", "cluster_02_backprojected.mrc"]
    stack = read_star(run / "particles.star", require_images=True)
    full = tmp_path / "full.mrc"
    from cryofire_ext.images import write_mrc

    write_mrc(full, reconstruct(stack.images, pred.A, pred.shifts_A, stack.ctf, stack.pixel_size_A).numpy(), 6.0)
    for j, path in enumerate(res.backprojected_maps):
        with mrcfile.open(path) as m:
            assert m.voxel_size.x == pytest.approx(stack.pixel_size_A) and m.data.shape == maps[0].shape
        own = int(np.bincount(state[res.clustering.labels == j]).argmax())
        c_own, c_other = (_corr(path, maps[s], lowpass=0.5) for s in (own, 1 - own))
        c_full = _corr(full, maps[own], lowpass=0.5)
        print(f"cluster {j + 1}: own state {c_own:.3f}, other state {c_other:.3f}, full set {c_full:.3f}")
        assert c_own > c_other + 0.01 and c_own > c_full + 0.005
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    assert summary["backprojected_maps"] == ["maps/cluster_01_backprojected.mrc", "maps/cluster_02_backprojected.mrc"]


@pytest.fixture
def trained_run_dir(trained_run) -> Path:
    """The session's tiny trained run (tests/run_fixture.py, registered in conftest)."""
    return Path(trained_run)


def test_analyze_and_eval_vol_on_a_trained_run(trained_run_dir, tmp_path, capsys):
    run = trained_run_dir
    pred = Predictions.load(run / "predictions.npz")
    out = tmp_path / "analysis"
    assert main(["analyze", str(run), "-o", str(out), "--clusters", "2", "--steps", "3"]) == 0
    source = analysis.load_volume_source(run)
    for path in sorted((out / "maps").glob("cluster_*.mrc")) + sorted((out / "maps" / "pc1_traversal").glob("*.mrc")):
        with mrcfile.open(path) as m:
            assert m.data.shape == (source.volumes(pred.z[:1]).shape[-1],) * 3
            assert m.voxel_size.x == pytest.approx(source.pixel_size_A, rel=1e-5)
            assert np.isfinite(m.data).all() and m.data.std() > 0
    assert len(list((out / "maps").glob("cluster_??.mrc"))) == 2  # the decoder's, at the cluster centres
    # this run folder has no particles.star (so no images at poses): no back-projected maps, no failure
    assert not (run / "particles.star").exists() and not list((out / "maps").glob("*_backprojected.mrc"))
    assert len(list((out / "maps" / "pc2_traversal").glob("*.mrc"))) == 3
    import html.parser

    links = []

    class P(html.parser.HTMLParser):
        def handle_starttag(self, tag, attrs):
            links.extend(v for k, v in attrs if k in ("href", "src"))

    P().feed((out / "report.html").read_text())
    assert links and all((out / link).is_file() for link in links)
    # the decoder's maps along each traversal and the path through the 2 cluster centres: a montage (one
    # 110 px panel per map) and a ChimeraX file naming the series' maps in order, both linked from the report
    from matplotlib.image import imread

    from cryofire_ext.analysis import plots

    for name in ("pc1_traversal", "pc2_traversal", "cluster_path"):
        img = imread(out / "plots" / f"{name}.png")[..., :3]
        assert 3 * plots.MONTAGE_PANEL_IN * plots.DPI < img.shape[1] < 4 * plots.MONTAGE_PANEL_IN * plots.DPI
        grey = img.mean(-1)
        drawn = grey < 0.95  # the panels, not the white figure (this tiny model's maps have a grey background)
        assert drawn.mean() > 0.5 and grey[drawn].std() > 0.05
        cxc = out / "maps" / f"{name}.cxc"
        lines = [ln.split() for ln in cxc.read_text().splitlines() if ln and not ln.startswith("#")]
        assert lines[0] == ["open"] + [f"{name}/step_{s:02d}.mrc" for s in (1, 2, 3)] + ["vseries", "true"]
        assert all((cxc.parent / p).is_file() for p in lines[0][1:4])
        assert lines[1][:5] == ["volume", "#1", "style", "surface", "level"] and np.isfinite(float(lines[1][5]))
        assert {f"plots/{name}.png", f"maps/{name}.cxc"} <= set(links)
    assert "chimerax maps/pc1_traversal.cxc" in (out / "maps" / "pc1_traversal.cxc").read_text()
    # maps at given points: the model's own map at a particle's z, and the dimension is checked
    z0 = ",".join(f"{v:.6f}" for v in pred.z[0])
    assert main(["eval-vol", str(run), "--z", z0, "-o", str(tmp_path / "vols")]) == 0
    with mrcfile.open(tmp_path / "vols" / "vol_001.mrc") as m:
        np.testing.assert_allclose(m.data, source.volumes(pred.z[:1])[0], rtol=1e-3, atol=1e-5)
    bad = ",".join(["0"] * (pred.zdim + 1))
    assert main(["eval-vol", str(run), "--z", bad, "-o", str(tmp_path / "vols2")]) == 2
    assert f"dimension {pred.zdim}" in capsys.readouterr().err


def test_subsets_follow_row_order_when_the_run_file_names_particles_differently(star_run, tmp_path, capsys):
    """A run's particles.star is written in the predictions' order but may name particles differently
    (e.g. predictions from a .cs carry uids): rows are then matched by order; a different count is an error."""
    run, state, _ = star_run
    pred = Predictions.load(run / "predictions.npz")
    Predictions(ids=[f"uid{i}" for i in range(len(pred))], A=pred.A, shifts_A=pred.shifts_A, z=pred.z,
                loss=pred.loss, meta=pred.meta).save(run / "predictions.npz", force=True)
    assert main(["analyze", str(run), "--no-maps", "--no-subsets"]) == 0
    assert main(["select", str(run), "--clusters", "2", "-o", str(tmp_path / "c2.star")]) == 0
    clus, _ = analysis.load_clustering(run / "analysis" / "clusters.npz")
    original = starfile.read(run / "particles.star")["particles"]
    p = starfile.read(tmp_path / "c2.star")["particles"]
    np.testing.assert_allclose(p["rlnCoordinateX"], original["rlnCoordinateX"].to_numpy()[clus.labels == 1])
    keep = np.ones(len(pred), bool)
    keep[:3] = False
    Predictions(ids=[f"uid{i}" for i in range(len(pred) - 3)], A=pred.A[keep], shifts_A=pred.shifts_A[keep],
                z=pred.z[keep], loss=pred.loss[keep], meta=pred.meta).save(run / "predictions.npz", force=True)
    assert main(["analyze", str(run), "--no-maps", "--force"]) == 2
    assert "not in this file" in capsys.readouterr().err


def test_analyze_writes_3d_variability_from_the_particles_at_their_poses(tmp_path, capsys):
    """`cryofire analyze` on a run whose particles.star has readable stacks: variability.npz (the particles'
    coordinates, independent of z), maps along each component with their voxel size, a plot, and report
    links that resolve; --variability 0 turns it off and a negative count is refused."""
    import html.parser

    run, state, _ = simulated_run(tmp_path, n=400, snr=3.0)
    pred = Predictions.load(run / "predictions.npz")
    assert main(["analyze", str(run), "--no-maps", "--no-subsets", "--steps", "4"]) == 0
    assert "3D variability: 2 component(s) at 20 A" in capsys.readouterr().out
    out = run / "analysis"
    with np.load(out / "variability.npz") as f:
        header = json.loads(str(f["header"]))
        assert header["format"] == "cryofire-variability" and header["components"] == 2
        assert list(f["ids"]) == list(pred.ids) and f["coords"].shape == (400, 2)
        r = abs(np.corrcoef(f["coords"][:, 0], state)[0, 1])
    print(f"|corr(variability coordinate 1, state)| {r:.3f}")
    assert r > 0.7  # the two states differ by the arm's swing; the first component finds it
    steps = sorted((out / "maps" / "variability1").glob("step_*.mrc"))
    assert len(steps) == 4
    with mrcfile.open(steps[0]) as m:
        assert m.voxel_size.x == pytest.approx(header["pixel_size_A"]) and m.data.shape == (header["box"],) * 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["variability"]["maps"]["variability2"][0] == "maps/variability2/step_01.mrc"
    links = []

    class P(html.parser.HTMLParser):
        def handle_starttag(self, tag, attrs):
            links.extend(v for k, v in attrs if k in ("href", "src"))

    P().feed((out / "report.html").read_text())
    assert "variability.npz" in links and "plots/variability_clusters.png" in links
    assert all((out / link).is_file() for link in links)
    assert main(["analyze", str(run), "-o", str(tmp_path / "a0"), "--no-maps", "--no-subsets",
                 "--variability", "0"]) == 0
    assert not (tmp_path / "a0" / "variability.npz").exists()
    assert main(["analyze", str(run), "-o", str(tmp_path / "a1"), "--no-maps", "--variability", "-1"]) == 2
    assert "--variability" in capsys.readouterr().err
