"""Every transfer syntax the listener accepts decodes to the tensor of the original pixels.

Encodings come from real peer tools run on real radiographs: DCMTK (dcmconv, dcmcjpeg,
dcmcjpls, dcmcrle) and pydicom 3 with pylibjpeg-openjpeg for JPEG 2000.  Source: the NEMA
CR (10-bit MONOCHROME1 with a window), except JPEG baseline, which is 8-bit only and
uses the SIIM CR decompressed by DCMTK.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.uid import JPEG2000, UID, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless

from dicom_io.pixels import load_image, to_model_tensor
from dicom_io.resize import letterbox_transformed
from settings import TRANSFER_SYNTAXES
from tests.plugins.pixels import ENCODERS, LOSSY

# Lossy tolerances on the (224, 224) tensor in [0, 1]; measured values are about half.
LOSSY_TOLERANCE = {
    JPEGBaseline8Bit: (0.005, 0.001),  # quality 95, 8-bit
    JPEGExtended12Bit: (0.005, 0.001),  # quality 95, 10 bits in 12
    JPEGLSNearLossless: (0.003, 0.001),  # NEAR=2 grey levels of 1023 at window width 1024
    JPEG2000: (0.01, 0.002),  # compression ratio 15
}
# NEAR=2 bounds the per-pixel error: 2 stored levels over a LINEAR window of width 1024.
JPEG_LS_NEAR_BOUND = 2 / (1024 - 1)


@pytest.mark.dcmtk
def test_every_accepted_syntax_has_an_encoder() -> None:
    assert {str(ts) for ts in ENCODERS} == set(TRANSFER_SYNTAXES.values())


@pytest.mark.dcmtk
@pytest.mark.parametrize("ts", list(ENCODERS), ids=lambda ts: UID(ts).keyword or str(ts))
def test_round_trip(ts, nema_file, siim_uncompressed, encode_real) -> None:
    source = siim_uncompressed if ts == JPEGBaseline8Bit else nema_file
    encoded = encode_real(source, ts)
    expected = to_model_tensor(source)
    # The decoder is what is tested here: the full-resolution route (the SIIM JPEG would
    # otherwise be decoded at half size; tests/test_reduced_decode.py bounds that route).
    got = letterbox_transformed(*load_image(encoded)._source(), 224)[..., np.newaxis]
    assert got.shape == (224, 224, 1) and got.dtype == np.float32
    result = load_image(encoded)
    assert result.transfer_syntax == str(ts)
    if ts in LOSSY:
        max_tol, mean_tol = LOSSY_TOLERANCE[ts]
        diff = np.abs(got - expected)
        assert diff.max() <= max_tol and diff.mean() <= mean_tol, (diff.max(), diff.mean())
    else:
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(result.image, load_image(source).image)


@pytest.mark.dcmtk
def test_jpeg_ls_near_lossless_error_is_bounded_by_near(nema_file, encode_real) -> None:
    encoded = encode_real(nema_file, JPEGLSNearLossless)
    diff = np.abs(load_image(encoded).image - load_image(nema_file).image)
    assert diff.max() <= JPEG_LS_NEAR_BOUND + 1e-6
    assert diff.max() > 0  # really lossy: the test would otherwise prove nothing


@pytest.mark.dcmtk
def test_siim_baseline_matches_an_independent_decoder(siim_path, siim_uncompressed) -> None:
    """pylibjpeg-libjpeg and DCMTK's IJG decoder may round the IDCT differently by a level."""
    ours = load_image(siim_path).image
    dcmtk = load_image(siim_uncompressed).image
    assert np.abs(ours - dcmtk).max() <= 2 / 227 + 1e-6  # 2 grey levels in the SIIM window
    full = letterbox_transformed(*load_image(siim_path)._source(), 224)[..., np.newaxis]
    np.testing.assert_allclose(full, to_model_tensor(siim_uncompressed), atol=0.005)
