"""Projection against RELION's own projector: real relion_project images of the 70S ribosome and a live run."""

import subprocess

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from cryofire_ext import fourier
from cryofire_ext.ctf import CTFParams
from cryofire_ext.errors import InputError
from cryofire_ext.phantom import phantom_maps
from cryofire_ext.poses import random_rotations, relion_euler_to_matrix
from cryofire_ext.recon.projection import Projector, correlation, project
from tests.conftest import require_relion, shared_fixture

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def ribosome_projectors():
    vol = mrcfile.read(shared_fixture("aspire/clean70SRibosome_vol_65p.mrc")).astype(np.float64)
    # the 64-px sets were projected from the 65^3 map Fourier-cropped to 64^3 (ASPIRE's Volume.downsample)
    F = fourier.fft3_centered(torch.from_numpy(vol))
    vol64 = fourier.ifft3_centered(F[:64, :64, :64]).real * (64 / 65) ** 3
    return {65: Projector(torch.from_numpy(vol)), 64: Projector(vol64)}


def _relion_set(name):
    table = starfile.read(shared_fixture(f"aspire/{name}.star"))
    df = table["particles"] if isinstance(table, dict) else table
    A = relion_euler_to_matrix(df.rlnAngleRot, df.rlnAngleTilt, df.rlnAnglePsi)
    if "rlnOriginXAngst" in df:  # these files have 1 A/px (or no shifts)
        sh = np.stack([df.rlnOriginXAngst, df.rlnOriginYAngst], 1)
    else:
        sh = np.stack([df.rlnOriginX, df.rlnOriginY], 1)
    return A, sh, mrcfile.read(shared_fixture(f"aspire/{name}.mrcs")).astype(np.float64)


@pytest.mark.parametrize("name, min_corr", [
    ("rln_proj_65", 0.99), ("rln_proj_65_centered", 0.99), ("rln_proj_65_shifted", 0.99),
    ("rln_proj_64_centered", 0.99), ("rln_proj_64_shifted", 0.99),
    # rln_proj_64.mrcs was made (by ASPIRE's authors) from another 64^3 map than the Fourier crop we can
    # rebuild: 0.952..0.991 per image; the poses still match far better than any wrong convention (< 0.6)
    ("rln_proj_64", 0.95),
])
def test_matches_relion_project_images_of_the_70s_ribosome(ribosome_projectors, name, min_corr):
    A, shifts_px, rln = _relion_set(name)
    box = rln.shape[-1]
    ours = ribosome_projectors[box].project(torch.from_numpy(A), torch.from_numpy(shifts_px)).double()
    if box % 2:
        # relion_project writes odd-box images with the centre at index (D+1)/2, one pixel past its own
        # centre D//2 (ASPIRE's tests note the same offset); even boxes have no offset
        ours = torch.roll(ours, (1, 1), (-2, -1))
    corr = correlation(ours, rln)
    assert corr.min() >= min_corr, corr
    # same amplitude as RELION (sum of voxels along the ray), not just the same pattern
    assert float(ours.std() / rln.std()) == pytest.approx(1.0, abs=0.02) or name == "rln_proj_64"
    # the transpose (the classic A vs A^T slip) does not match
    wrong = ribosome_projectors[box].project(torch.from_numpy(A.transpose(0, 2, 1)), torch.from_numpy(shifts_px))
    assert correlation(wrong, rln).mean() < 0.7


def _write_star(path, A, shifts_A, ctf: CTFParams, apix, box):
    from cryofire_ext.poses import matrix_to_relion_euler

    e = matrix_to_relion_euler(A)
    n = len(A)
    import pandas as pd

    optics = pd.DataFrame(dict(rlnOpticsGroup=[1], rlnOpticsGroupName=["g1"], rlnVoltage=[ctf.voltage_kv[0]],
                               rlnSphericalAberration=[ctf.cs_mm[0]], rlnAmplitudeContrast=[ctf.amplitude_contrast[0]],
                               rlnImagePixelSize=[apix], rlnImageSize=[box], rlnImageDimensionality=[2]))
    parts = pd.DataFrame(dict(rlnImageName=[f"{i + 1:06d}@none.mrcs" for i in range(n)], rlnAngleRot=e[:, 0],
                              rlnAngleTilt=e[:, 1], rlnAnglePsi=e[:, 2], rlnOriginXAngst=shifts_A[:, 0],
                              rlnOriginYAngst=shifts_A[:, 1], rlnDefocusU=ctf.defocus_u_A, rlnDefocusV=ctf.defocus_v_A,
                              rlnDefocusAngle=np.degrees(ctf.defocus_angle_rad),
                              rlnPhaseShift=np.degrees(ctf.phase_shift_rad), rlnCtfBfactor=ctf.bfactor_A2,
                              rlnOpticsGroup=np.ones(n, dtype=int)))
    starfile.write({"optics": optics, "particles": parts}, path, overwrite=True)


def relion_project_images(tmp_path, volume, A, shifts_A, ctf: CTFParams, apix) -> np.ndarray:
    """`relion_project --ctf` of `volume` `(D, D, D)` at poses `A`, origins `shifts_A` (A) and `ctf`: `(n, D, D)`."""
    with mrcfile.new(tmp_path / "map.mrc") as f:
        f.set_data(np.asarray(volume, dtype=np.float32))
        f.voxel_size = apix
    _write_star(tmp_path / "p.star", A, shifts_A, ctf, apix, volume.shape[-1])
    subprocess.run(["relion_project", "--i", "map.mrc", "--o", "proj", "--ang", "p.star", "--ctf", "--angpix",
                    str(apix)], cwd=tmp_path, check=True, capture_output=True)
    return mrcfile.read(tmp_path / "proj.mrcs").astype(np.float64)


def test_live_relion_project_with_ctf_and_shifts(tmp_path):
    """An independent STAR (written here with starfile) -> relion_project --ctf vs our project(); odd box too."""
    require_relion("relion_project")
    rng = np.random.default_rng(5)
    maps, apix = phantom_maps(32)
    n = 6
    A = random_rotations(n, rng)
    shifts_A = rng.uniform(-4, 4, (n, 2)) * apix
    du = rng.uniform(8000, 25000, n)
    ctf = CTFParams(du, du - 4000.0, rng.uniform(0, np.pi, n), 300.0, 2.7, 0.1, rng.uniform(0, 1, n), 40.0, 1.0)
    rln = relion_project_images(tmp_path, maps[1], A, shifts_A, ctf, apix)
    ours = project(maps[1], A, shifts_A, ctf, pixel_size_A=apix)
    corr = correlation(ours, rln)
    assert corr.min() >= 0.99, corr
    assert float(ours.std() / rln.std()) == pytest.approx(1.0, abs=0.02)


def test_project_rejects_bad_maps():
    with pytest.raises(InputError, match="cubic"):
        project(np.zeros((8, 8, 9)), np.eye(3)[None])
    with pytest.raises(InputError, match="cubic"):
        project(np.zeros((8, 8)), np.eye(3)[None])
