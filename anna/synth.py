"""Example data for ANNA-TF: a teaching model of stellar line spectra, and a packer for real spectra.

ANNA's tutorial relied on a download that no longer exists.  This module makes equivalent data on the spot so
the whole pipeline (train, test, infer on a multispec FITS file) runs out of the box, and it turns a folder of
real spectra plus a CSV of labels into a training pack (``anna-pack``).

**This is a teaching model, not radiative transfer.**  There is no model atmosphere, no depth dependence and
no line-by-line solution of the transfer equation.  What it keeps is the way each label leaves its signature
on a continuum-normalised spectrum, so that a network trained on it has to learn the same cues it would learn
from real spectra:

* **Line list.**  58 real atomic lines between 6590 and 6860 A (Fe I, Ni I, Ca I, Si I, Ti I, Co I, Al I,
  Li I; Sc II, Y II, Eu II) with laboratory wavelengths and approximate excitation potentials and log gf
  values.  Molecules and H alpha (6563 A, outside the window) are left out; lithium keeps the solar abundance.
* **Line strength** (weak-line equivalent width ``W0``).  For line ``i`` of element ``X`` in stage ``s``::

      W0 ∝ gf · 10**(A_X - 12 + [X/H]) · (N_s / N_X) / u_s · 10**(-theta · chi_exc) · lambda**2 / kappa_c

  with ``theta = 5040 / T_line`` and ``T_line = 0.92 Teff`` (lines form above the photosphere).  The
  Boltzmann factor ``10**(-theta chi_exc)/u_s`` makes high-excitation lines gain relative to low-excitation
  ones in hotter stars; the Saha ionisation fraction ``N_s/N_X`` (with ``log N_II/N_I = log(u_II/u_I)
  + 2.5 log T - theta chi_ion - 0.1762 - log P_e``) and the H- continuous opacity ``kappa_c ∝ P_e
  theta**2.5 10**(0.754 theta)`` make neutral lines of mostly ionised metals (Fe I, Ni I...) fade quickly
  with temperature and leave them nearly gravity-blind, while lines of ionised species (Sc II, Y II, Eu II)
  weaken as the electron pressure ``P_e`` rises with log g (``P_e ∝ g**(1/3)``).  Hot stars therefore have
  weak metal lines, and few of them in this window.  [Fe/H] scales every metal; the alpha elements Ca, Si
  and Ti follow the thin-disc trend ``[alpha/Fe] = clip(-0.4 [Fe/H], 0, 0.4)``.  ``W0`` is scaled by one
  constant fixed so that Fe I 6703.57 has 38 mA in the Sun (other solar lines then come out within about
  0.1 dex of their measured equivalent widths); solar abundances are Asplund et al. (2009).
* **Curve of growth.**  With Doppler parameter ``b = sqrt(2kT_line/m + vmic**2)`` the line-centre optical
  depth is ``tau0 = W0 / (sqrt(pi) b)``.  The equivalent width of a slab whose lines cannot get deeper than
  ``d_max = 0.85`` (Minnaert's residual flux), ``d_max ∫(1 - exp(-tau0/d_max H(a,x)))dx``, is taken as the
  exact Doppler part (tabulated numerically) plus the closed-form Lorentz-wing part outside the saturated core, with damping ``a = Gamma / (4 pi Delta nu_D)``, ``Gamma = Gamma_rad + Gamma_vdW`` and
  ``Gamma_vdW`` growing with gas pressure (higher log g, cooler, more metal-poor).  So weak lines ignore
  microturbulence and damping, saturated lines strengthen with ``vmic``, strong lines grow damping wings
  in dwarfs.
* **Profile.**  Each line is a Voigt profile of area ``W``: Gaussian core with ``b`` widened as the core
  saturates (the central depth of an isolated line stays below ``d_max``) and Lorentz wings whose strength matches
  ``tau0 a / (sqrt(pi) x**2)``.  The lines' absorptions add up linearly (``flux = 1 - sum``, floored at 0),
  so every broadening below conserves each line's equivalent width exactly.
* **Broadening and shift**, applied analytically in Fourier space on a ``log lambda`` (velocity) grid:
  rotation with the classical kernel of Gray (linear limb darkening, epsilon = 0.6), the instrument as a
  Gaussian of FWHM ``lambda / R``, and a Doppler shift ``lambda -> lambda (1 + v/c)``.  The result is
  interpolated (cubic) from a grid ten times finer than the instrumental sigma onto the requested pixels.

Example-data products (:func:`make_example_data`): ``train.pack``, ``xval.pack``, ``test.pack`` (noise-free,
labels uniform in :data:`DEFAULT_LABEL_RANGES`, each spectrum shifted by a small residual radial velocity
drawn uniformly in +-2 km/s and stored in the pack's dummy column, so a network learns to tolerate imperfect
velocity correction), ``sn.template`` and ``wavelength.template``, ``star_multispec.fits`` (noisy spectra of
one star in IRAF multispec format on a different, per-aperture linear grid) and ``star_labels.json``.
"""

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
from scipy import fft as scipy_fft
from scipy import special

from anna.atomic import atomic_output
from anna.errors import AnnaInputError
from anna.packs import write_pack
from anna.resample import cubic_resample
from anna.templates import read_two_columns

DEFAULT_LABEL_NAMES = ("teff", "logg", "feh", "vmic", "vsini")
DEFAULT_LABEL_RANGES = ((4000., 7000.), (2.7, 4.8), (-0.5, 0.2), (0.0, 3.0), (0.0, 40.0))

SOLAR_LABELS = (5772.0, 4.44, 0.0, 1.0, 2.0)
"""Labels of the Sun (teff K, logg cgs, [Fe/H], vmic km/s, vsini km/s) used for the wavelength template."""

SPEED_OF_LIGHT_KMS = 299792.458
LIMB_DARKENING = 0.6
"""Linear limb-darkening coefficient of the rotation kernel (typical of the optical for FGK stars)."""

# Grid of ANNA's tutorial: 6625-6825 A at 0.2 A per pixel.
GRID_START, GRID_STEP, GRID_PIXELS = 6625.0, 0.2, 1001

# S/N template of the example fibre spectrograph: 6450-6850 A at 0.2 A per pixel.
SN_TEMPLATE_START, SN_TEMPLATE_STEP, SN_TEMPLATE_PIXELS = 6450.0, 0.2, 2001

RESIDUAL_RV_KMS = 2.0
"""Half-width (km/s) of the uniform residual radial velocity applied to pack spectra and stored in dummy."""

# ---------------------------------------------------------------------------------------------------------
# Atomic data

# element: (atomic mass in u, solar abundance A(X) = log eps, first ionisation energy eV, u_I, u_II, alpha?)
# Partition functions are rough values for 5000-6000 K, held constant: good enough for a teaching model.
ELEMENTS = {
    "Li": (6.94, 1.05, 5.392, 2.1, 1.0, False),
    "Al": (26.98, 6.45, 5.986, 5.9, 1.0, False),
    "Si": (28.09, 7.51, 8.152, 9.5, 5.7, True),
    "Ca": (40.08, 6.34, 6.113, 1.2, 2.2, True),
    "Sc": (44.96, 3.15, 6.561, 10.0, 22.0, False),
    "Ti": (47.87, 4.95, 6.828, 30.0, 55.0, True),
    "Fe": (55.85, 7.50, 7.902, 30.0, 46.0, False),
    "Co": (58.93, 4.99, 7.881, 30.0, 27.0, False),
    "Ni": (58.69, 6.22, 7.640, 29.0, 10.0, False),
    "Y": (88.91, 2.21, 6.217, 10.0, 14.0, False),
    "Eu": (151.96, 0.52, 5.670, 9.0, 15.0, False),
}

# (wavelength in air, A; species; lower excitation potential, eV; log gf).  Real lines of the 6590-6860 A
# region with approximate atomic data; the Li I doublet is merged into one line of summed gf.
LINE_LIST = (
    (6593.871, "Fe I", 2.433, -2.422),
    (6597.561, "Fe I", 4.795, -0.970),
    (6599.105, "Ti I", 0.900, -2.085),
    (6604.601, "Sc II", 1.357, -1.309),
    (6608.025, "Fe I", 2.279, -4.030),
    (6609.110, "Fe I", 2.559, -2.692),
    (6625.022, "Fe I", 1.011, -5.336),
    (6627.545, "Fe I", 4.548, -1.590),
    (6632.433, "Co I", 2.280, -2.000),
    (6633.749, "Fe I", 4.558, -0.799),
    (6635.122, "Ni I", 4.420, -0.830),
    (6643.630, "Ni I", 1.676, -2.300),
    (6645.064, "Eu II", 1.380, 0.120),
    (6646.932, "Fe I", 2.608, -3.990),
    (6648.080, "Fe I", 1.011, -5.918),
    (6663.442, "Fe I", 2.424, -2.479),
    (6677.985, "Fe I", 2.692, -1.418),
    (6696.023, "Al I", 3.143, -1.347),
    (6698.673, "Al I", 3.143, -1.647),
    (6699.142, "Fe I", 4.593, -2.101),
    (6703.566, "Fe I", 2.758, -3.060),
    (6704.481, "Fe I", 4.217, -2.660),
    (6705.101, "Fe I", 4.607, -0.980),
    (6707.810, "Li I", 0.000, 0.174),
    (6710.318, "Fe I", 1.485, -4.880),
    (6713.743, "Fe I", 4.795, -1.500),
    (6716.237, "Fe I", 4.580, -1.920),
    (6717.681, "Ca I", 2.709, -0.524),
    (6721.848, "Si I", 5.863, -1.120),
    (6725.356, "Fe I", 4.103, -2.300),
    (6726.666, "Fe I", 4.607, -1.030),
    (6732.065, "Fe I", 4.584, -2.210),
    (6733.151, "Fe I", 4.638, -1.480),
    (6739.522, "Fe I", 1.557, -4.790),
    (6741.628, "Si I", 5.984, -1.650),
    (6743.122, "Ti I", 0.900, -1.630),
    (6745.957, "Fe I", 4.076, -2.770),
    (6746.955, "Fe I", 2.609, -4.350),
    (6750.152, "Fe I", 2.424, -2.621),
    (6752.707, "Fe I", 4.638, -1.204),
    (6767.768, "Ni I", 1.826, -2.170),
    (6772.315, "Ni I", 3.658, -0.980),
    (6783.704, "Fe I", 2.588, -3.980),
    (6786.856, "Fe I", 4.191, -1.970),
    (6793.259, "Fe I", 4.076, -2.330),
    (6795.414, "Y II", 1.738, -1.030),
    (6806.845, "Fe I", 2.727, -3.110),
    (6810.263, "Fe I", 4.607, -0.986),
    (6814.942, "Co I", 1.956, -1.900),
    (6820.372, "Fe I", 4.638, -1.170),
    (6828.591, "Fe I", 4.638, -0.820),
    (6837.006, "Fe I", 4.593, -1.690),
    (6839.830, "Fe I", 2.559, -3.350),
    (6841.339, "Fe I", 4.607, -0.750),
    (6842.037, "Ni I", 3.658, -1.480),
    (6842.686, "Fe I", 4.638, -1.220),
    (6843.656, "Fe I", 4.548, -0.830),
    (6855.162, "Fe I", 4.559, -0.740),
)

# Constants of the teaching model (see the module docstring).
LINE_TEMPERATURE_FRACTION = 0.92
LOG_STRENGTH_SCALE = 12.8657
"""log10 of the constant turning the line-strength expression into W0 in Angstrom (Fe I 6703.57 ~ 38 mA)."""
LOG_PE_SUN = 0.5
"""log10 electron pressure (dyn cm^-2) in the line-forming layers of the Sun."""
PE_THETA_SLOPE = 2.5
"""-d log P_e / d theta_eff: hotter atmospheres have far more free electrons (metals, then hydrogen)."""
LOG_GAMMA_RAD = 8.0
"""log10 radiative damping constant (s^-1), the same for all lines."""
LOG_GAMMA_VDW_SUN, GAMMA_VDW_CHI_SLOPE = 8.3, 0.12
"""Solar van der Waals damping, log10 s^-1, rising with excitation (upper levels nearer the continuum)."""
THETA_SUN = 5040.0 / 5772.0
MAX_CENTRAL_DEPTH = 0.85
"""Deepest a line can get (the residual flux of real saturated lines is never zero)."""
ROTATION_TABLE_SIZE = 4097
ATOMIC_MASS_UNIT_KG = 1.66053906660e-27
BOLTZMANN_J_PER_K = 1.380649e-23


def default_grid():
    """ANNA's tutorial grid: 6625-6825 A at 0.2 A per pixel, shape (1001,), float64 Angstrom.

    Each value is the float nearest to its decimal (6625.2, not 6625.2000000000007), as a text template
    written with those decimals would read back.
    """
    return np.round(GRID_START + GRID_STEP * np.arange(GRID_PIXELS), 6)


def _line_table(wave_min=-np.inf, wave_max=np.inf):
    """Arrays describing the lines of :data:`LINE_LIST` between ``wave_min`` and ``wave_max`` (Angstrom)."""
    rows = [row for row in LINE_LIST if wave_min <= row[0] <= wave_max]
    element = [row[1].split()[0] for row in rows]
    ionised = np.array([row[1].split()[1] == "II" for row in rows])
    props = np.array([ELEMENTS[name][:5] for name in element], dtype=np.float64).reshape(-1, 5)
    return {
        "wavelength": np.array([row[0] for row in rows], dtype=np.float64),
        "chi_exc": np.array([row[2] for row in rows], dtype=np.float64),
        "log_gf": np.array([row[3] for row in rows], dtype=np.float64),
        "ionised": ionised,
        "mass": props[:, 0],
        "abundance": props[:, 1],
        "chi_ion": props[:, 2],
        "u_neutral": props[:, 3],
        "u_ion": props[:, 4],
        "alpha": np.array([ELEMENTS[name][5] for name in element], dtype=bool),
    }


def _doppler_growth_table():
    """Exact Doppler curve of growth as a table: (log10 tau0, log10 of F_D / (sqrt(pi) tau0)).

    ``F_D(tau0) = ∫ (1 - exp(-tau0 exp(-x^2))) dx`` over all x (in Doppler units); the ratio to its
    optically thin limit ``sqrt(pi) tau0`` goes from 1 to about ``2 sqrt(ln tau0) / (sqrt(pi) tau0)``.
    Cheap (~10^5 exponentials), so it is recomputed per call rather than cached in module state.
    """
    log_tau = np.linspace(-6.0, 10.0, 161)
    x = np.linspace(0.0, 6.5, 1301)
    integrand = -np.expm1(-(10.0 ** log_tau)[:, None] * np.exp(-x * x)[None, :])
    area = 2.0 * np.trapezoid(integrand, x, axis=1)
    return log_tau, np.log10(area / (math.sqrt(math.pi) * 10.0 ** log_tau))


def _line_parameters(labels, lines):
    """Equivalent widths and profile widths of every line for every star.

    ``labels`` (n, 5): teff K, logg, [Fe/H], vmic km/s, vsini km/s.  Returns three (n, n_lines) arrays in
    km/s (velocity units at each line's wavelength): equivalent width ``W``, Gaussian Doppler parameter of the
    profile ``b_profile`` and Lorentz half width ``gamma_profile``.
    """
    teff, logg, feh, vmic = (labels[:, j:j + 1] for j in range(4))
    t_line = LINE_TEMPERATURE_FRACTION * teff
    theta_line = 5040.0 / t_line
    theta_eff = 5040.0 / teff
    log_pe = LOG_PE_SUN + (logg - 4.44) / 3.0 - PE_THETA_SLOPE * (theta_eff - THETA_SUN)

    # Saha: log N_II / N_I for each line's element.
    log_ion_ratio = (np.log10(lines["u_ion"] / lines["u_neutral"]) + 2.5 * np.log10(t_line)
                     - theta_line * lines["chi_ion"] - 0.1762 - log_pe)
    log_stage_fraction = np.where(lines["ionised"],
                                  -np.logaddexp(0.0, -log_ion_ratio * np.log(10.0)) / np.log(10.0),
                                  -np.logaddexp(0.0, log_ion_ratio * np.log(10.0)) / np.log(10.0))
    log_partition = np.log10(np.where(lines["ionised"], lines["u_ion"], lines["u_neutral"]))
    log_kappa = log_pe + 2.5 * np.log10(theta_line) + 0.754 * theta_line
    alpha_enhancement = np.clip(-0.4 * feh, 0.0, 0.4)
    log_abundance = lines["abundance"] - 12.0 + feh + np.where(lines["alpha"], alpha_enhancement, 0.0)
    wavelength = lines["wavelength"]
    log_w0_angstrom = (LOG_STRENGTH_SCALE + lines["log_gf"] + log_abundance + log_stage_fraction
                       - log_partition - theta_line * lines["chi_exc"] - log_kappa
                       + 2.0 * np.log10(wavelength / 6700.0))
    w0 = SPEED_OF_LIGHT_KMS * 10.0 ** log_w0_angstrom / wavelength  # km/s

    thermal = 2.0 * BOLTZMANN_J_PER_K * t_line / (lines["mass"] * ATOMIC_MASS_UNIT_KG) / 1e6
    b = np.sqrt(thermal + vmic ** 2)  # km/s
    tau0 = np.maximum(w0 / (math.sqrt(math.pi) * b), 1e-30)  # floor: vanishing lines stay finite

    log_pg_shift = 0.6 * (logg - 4.44) + 2.5 * (theta_eff - THETA_SUN) - 0.3 * feh
    gamma_total = (10.0 ** LOG_GAMMA_RAD
                   + 10.0 ** (LOG_GAMMA_VDW_SUN + GAMMA_VDW_CHI_SLOPE * lines["chi_exc"] + log_pg_shift))
    gamma_kms = gamma_total * wavelength * 1e-13 / (4.0 * math.pi)  # Lorentz HWHM, km/s
    damping = gamma_kms / b

    # Slab curve of growth with a largest central depth: tau' = tau0 / d_max keeps the weak-line limit and
    # lets lines saturate at the residual flux of real strong lines (Minnaert's picture).
    d_max = MAX_CENTRAL_DEPTH
    tau = tau0 / d_max
    table_log_tau, table_log_ratio = _doppler_growth_table()
    doppler_area = d_max * math.sqrt(math.pi) * tau * 10.0 ** np.interp(
        np.clip(np.log10(tau), table_log_tau[0], table_log_tau[-1]), table_log_tau, table_log_ratio)
    # Lorentz wings outside the saturated core: 2 ∫_{x_c}^inf (1 - exp(-c / x^2)) dx in closed form.
    c = tau * damping / math.sqrt(math.pi)
    x_core = np.sqrt(np.maximum(np.log(np.maximum(tau, 1.0)), 4.0))
    wing_area = 2.0 * d_max * (np.sqrt(math.pi * c) * special.erf(np.sqrt(c) / x_core)
                               + x_core * np.expm1(-c / x_core ** 2))
    area = doppler_area + np.maximum(wing_area, 0.0)  # in Doppler units

    # Profile: core widened by saturation so an isolated line's centre never drops below 1 - d_max, and
    # Lorentz wings as strong as the damping wings of the saturated line.
    central_depth = -d_max * np.expm1(-tau)
    b_profile = b * doppler_area / (math.sqrt(math.pi) * central_depth)
    gamma_profile = b * math.sqrt(math.pi) * tau0 * damping / area
    return b * area, b_profile, gamma_profile


def _rotation_transfer(z):
    """Fourier transform of Gray's rotation kernel (linear limb darkening) at ``z = 2 pi k vsini``; 1 at 0."""
    eps = LIMB_DARKENING
    z = np.asarray(z, dtype=np.float64)
    small = z < 1e-3
    zs = np.where(small, 1.0, z)
    disc = np.where(small, 1.0 - z * z / 8.0, 2.0 * special.j1(zs) / zs)
    limb = np.where(small, 1.0 / 3.0 - z * z / 30.0, (np.sin(zs) - zs * np.cos(zs)) / zs ** 3)
    return ((1.0 - eps) * disc + 2.0 * eps * limb) / (1.0 - eps / 3.0)


def _check_labels(labels):
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim == 1:
        labels = labels.reshape(1, -1)
    if labels.ndim != 2 or labels.shape[1] != len(DEFAULT_LABEL_NAMES):
        raise AnnaInputError(f"labels must have shape (n, {len(DEFAULT_LABEL_NAMES)}) "
                             f"({', '.join(DEFAULT_LABEL_NAMES)})", key="labels", value=labels.shape)
    if not np.isfinite(labels).all():
        raise AnnaInputError("labels must be finite", key="labels")
    for column, name, low in ((0, "teff", 1000.0), (3, "vmic", 0.0), (4, "vsini", 0.0)):
        if (labels[:, column] < low).any():
            bad = labels[np.argmax(labels[:, column] < low), column]
            raise AnnaInputError(f"{name} must be at least {low:g}", key=name, value=float(bad))
    return labels


def synthesize(wavelengths, labels, *, resolution=11000.0, rv_kms=None):
    """Continuum-normalised spectra of the teaching model (see the module docstring).

    ``wavelengths``: (npix,) ascending air wavelengths in Angstrom shared by all spectra, or (n, npix) one grid
    per spectrum.  ``labels``: (n, 5) teff (K), logg (cgs dex), [Fe/H] (dex), vmic (km/s), vsini (km/s).
    ``resolution``: resolving power R = lambda / FWHM of the Gaussian instrumental profile.  ``rv_kms``:
    (n,) radial velocities in km/s (positive = redshift, lambda_obs = lambda (1 + v/c)), or None for zero.
    Returns (n, npix) float64 flux, 1 in the continuum.  Vectorised: thousands of 1001-pixel spectra per
    second on one core at R = 11000 (the cost grows with R, through the finer internal grid).  The model is
    meant for FGK stars (roughly 3500-8000 K); outside that range it runs but means little.
    """
    labels = _check_labels(labels)
    n_stars = labels.shape[0]
    wave = np.asarray(wavelengths, dtype=np.float64)
    if wave.ndim not in (1, 2) or wave.shape[-1] < 2 or (wave.ndim == 2 and wave.shape[0] != n_stars):
        raise AnnaInputError(f"wavelengths must have shape (npix,) or ({n_stars}, npix) with npix >= 2",
                             key="wavelengths", value=wave.shape)
    if not np.isfinite(wave).all() or (wave <= 0).any() or not (np.diff(wave, axis=-1) > 0).all():
        raise AnnaInputError("wavelengths must be finite, positive and strictly ascending", key="wavelengths")
    resolution = float(resolution)
    if not (np.isfinite(resolution) and resolution > 0):
        raise AnnaInputError("resolution must be a positive number", key="resolution", value=resolution)
    rv = np.zeros(n_stars) if rv_kms is None else np.asarray(rv_kms, dtype=np.float64).reshape(-1)
    if rv.shape != (n_stars,) or not np.isfinite(rv).all() or (np.abs(rv) >= SPEED_OF_LIGHT_KMS / 10).any():
        raise AnnaInputError(f"rv_kms must be {n_stars} finite velocities below c/10 in size", key="rv_kms")

    c = SPEED_OF_LIGHT_KMS
    reference = float(wave.min())
    pixel_velocity = c * np.log(wave / reference)  # (npix,) or (n, npix), >= 0
    sigma_instrument = c / resolution / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    velocity_shift = c * np.log1p(rv / c)
    margin = 300.0 + 2.0 * float(labels[:, 4].max()) + 2.0 * float(np.abs(velocity_shift).max()) \
        + 8.0 * sigma_instrument
    span = float(pixel_velocity.max())
    box_start = -2.0 * margin
    box_length = span + 4.0 * margin
    lines = _line_table(reference * math.exp(-margin / c), reference * math.exp((span + margin) / c))
    line_velocity = c * np.log(lines["wavelength"] / reference) - box_start

    n_grid = scipy_fft.next_fast_len(int(math.ceil(box_length / (sigma_instrument / 10.0))), real=True)
    step = box_length / n_grid
    # Beyond k_max the instrumental transfer function is below 1e-9: nothing there survives.
    k_max = math.sqrt(math.log(1e9) / (2.0 * math.pi ** 2)) / sigma_instrument
    n_freq = min(n_grid // 2 + 1, int(math.ceil(k_max * box_length)) + 1)
    k = np.arange(n_freq) / box_length  # cycles per km/s
    instrument = np.exp(-2.0 * (math.pi * sigma_instrument * k) ** 2)

    # Each line's intrinsic profile transform h(k) = exp(-(pi b k)^2 - 2 pi gamma k) is smooth over
    # [0, k_top]; a Chebyshev series in k turns the sum over lines into one matrix product with a fixed basis
    # (Chebyshev polynomial x line phase factor) instead of an exponential per star, line and frequency.
    k_top = max(float(k[-1]), 1e-12)
    if len(line_velocity):
        width, b_profile, gamma_profile = _line_parameters(labels, lines)
        # Terms for an absolute error below 1e-8 of each line's area (found numerically for
        # exp(-X t^2 - Y t) on [0, 1]): wide, saturated profiles at high resolution need more.
        widest = (math.pi * float(b_profile.max()) * k_top) ** 2
        damped = 2.0 * math.pi * float(gamma_profile.max()) * k_top
        n_terms = int(math.ceil(12.0 + 2.4 * math.sqrt(widest) + 0.3 * damped))
    else:
        n_terms = 1
    node_angle = math.pi * (np.arange(n_terms) + 0.5) / n_terms
    k_nodes = 0.5 * k_top * (1.0 + np.cos(node_angle))
    node_to_coefficient = (2.0 / n_terms) * np.cos(np.outer(node_angle, np.arange(n_terms)))
    node_to_coefficient[:, 0] *= 0.5
    chebyshev = np.cos(np.outer(np.arange(n_terms), np.arccos(np.clip(2.0 * k / k_top - 1.0, -1.0, 1.0))))
    phase = -2.0 * math.pi * line_velocity[:, None] * k[None, :]
    basis_cos = (np.cos(phase)[:, None, :] * chebyshev[None, :, :]).reshape(-1, n_freq)
    basis_sin = (np.sin(phase)[:, None, :] * chebyshev[None, :, :]).reshape(-1, n_freq)

    vsini_max = float(labels[:, 4].max())
    rotation_z = np.linspace(0.0, 2.0 * math.pi * k_top * vsini_max, ROTATION_TABLE_SIZE)
    rotation_table = _rotation_transfer(rotation_z)

    # Cubic (four-point Lagrange) interpolation from the internal grid onto the pixels: error ~1e-7.
    position = (pixel_velocity - box_start) / step
    index = np.floor(position).astype(np.int64)
    t = position - index
    stencil = index[..., None] + np.arange(-1, 3)
    stencil_weight = np.stack([-t * (t - 1.0) * (t - 2.0) / 6.0, (t + 1.0) * (t - 1.0) * (t - 2.0) / 2.0,
                               -(t + 1.0) * t * (t - 2.0) / 2.0, (t + 1.0) * t * (t - 1.0) / 6.0], axis=-1)

    flux = np.empty((n_stars, wave.shape[-1]), dtype=np.float64)
    chunk = max(1, min(n_stars, 2_000_000 // n_grid))
    for start in range(0, n_stars, chunk):
        stop = min(start + chunk, n_stars)
        part = labels[start:stop]
        absorption = np.zeros((stop - start, n_freq), dtype=np.complex128)
        if len(line_velocity):
            at_nodes = np.exp(-(math.pi * b_profile[start:stop, :, None] * k_nodes) ** 2
                              - 2.0 * math.pi * gamma_profile[start:stop, :, None] * k_nodes)
            coefficients = (at_nodes @ node_to_coefficient) * width[start:stop, :, None]
            coefficients = coefficients.reshape(stop - start, -1)
            absorption.real = coefficients @ basis_cos
            absorption.imag = coefficients @ basis_sin
        if vsini_max > 0:
            rotation = np.interp(2.0 * math.pi * k[None, :] * part[:, 4:5], rotation_z, rotation_table)
            absorption *= instrument[None, :] * rotation
        else:
            absorption *= instrument[None, :]
        if velocity_shift[start:stop].any():
            absorption *= np.exp(-2j * math.pi * k[None, :] * velocity_shift[start:stop, None])
        spectrum_hat = np.zeros((stop - start, n_grid // 2 + 1), dtype=np.complex128)
        spectrum_hat[:, :n_freq] = absorption
        depth = scipy_fft.irfft(spectrum_hat, n=n_grid, axis=1) * (n_grid / box_length)
        if wave.ndim == 1:
            sampled = np.einsum("spj,pj->sp", depth[:, stencil], stencil_weight)
        else:
            rows = np.arange(stop - start)[:, None, None]
            sampled = np.einsum("spj,spj->sp", depth[rows, stencil[start:stop]], stencil_weight[start:stop])
        flux[start:stop] = np.maximum(1.0 - sampled, 0.0)
    return flux


def draw_labels(n, rng, ranges=DEFAULT_LABEL_RANGES):
    """``n`` label vectors drawn uniformly and independently within ``ranges``; shape (n, len(ranges)).

    ``rng`` is a :class:`numpy.random.Generator` (the caller owns the seed); ``ranges`` holds one
    ``(low, high)`` pair per label, by default :data:`DEFAULT_LABEL_RANGES` in the order of
    :data:`DEFAULT_LABEL_NAMES`.
    """
    bounds = np.asarray(ranges, dtype=np.float64)
    if bounds.ndim != 2 or bounds.shape[1] != 2 or not np.isfinite(bounds).all() \
            or (bounds[:, 1] < bounds[:, 0]).any():
        raise AnnaInputError("ranges must be finite (low, high) pairs with low <= high", key="ranges",
                             value=np.asarray(ranges).tolist())
    n = int(n)
    if n < 0:
        raise AnnaInputError("the number of labels to draw cannot be negative", key="n", value=n)
    return rng.uniform(bounds[:, 0], bounds[:, 1], size=(n, len(bounds)))


# ---------------------------------------------------------------------------------------------------------
# Templates


def fibre_relative_sn(wavelengths):
    """Relative S/N of the example fibre spectrograph at ``wavelengths`` (Angstrom), peak 1.0 in 6450-6850 A.

    A smooth instrument model: a grating blaze (sinc^2 centred on 6735 A) times the transmission of an
    order-sorting filter whose edges fall near 6470 and 6905 A.  Photon-limited S/N goes as the square root of
    the throughput.  Shape (npix,) like ``wavelengths``.
    """
    def throughput(wave):
        blaze = np.sinc((wave - 6735.0) / 900.0) ** 2
        passband = 0.25 * (1.0 + np.tanh((wave - 6470.0) / 30.0)) * (1.0 + np.tanh((6905.0 - wave) / 40.0))
        return blaze * passband

    reference = SN_TEMPLATE_START + SN_TEMPLATE_STEP * np.arange(SN_TEMPLATE_PIXELS)
    peak = float(np.sqrt(throughput(reference)).max())
    return np.sqrt(throughput(np.asarray(wavelengths, dtype=np.float64))) / peak


def _template_grid(start, stop, step):
    count = int(round((stop - start) / step)) + 1
    return np.round(start + step * np.arange(count), 6)


def _write_two_columns(path, header, first, second, second_format):
    first = np.asarray(first, dtype=np.float64).reshape(-1)
    second = np.asarray(second, dtype=np.float64).reshape(-1)
    if first.shape != second.shape or first.size < 2:
        raise AnnaInputError(f"need two columns of equal length >= 2 (got {first.size} and {second.size})",
                             path=path)
    if not (np.isfinite(first).all() and np.isfinite(second).all()) or not (np.diff(first) > 0).all():
        raise AnnaInputError("wavelengths must be finite and strictly ascending, values finite", path=path)
    text = "".join(f"{float(w)!r} {format(float(v), second_format)}\n" for w, v in zip(first, second))
    with atomic_output(path, "w", encoding="utf-8") as handle:
        handle.write(f"# {header}\n")
        handle.write(text)


def write_sn_template(path, wavelengths, rel_sn):
    """Write an S/N template (SN_TEMPLATE format): wavelength (Angstrom) and relative S/N, one pair a line.

    ``wavelengths`` (m,) strictly ascending, ``rel_sn`` (m,) positive.  A leading ``#`` line names the
    columns.  Written atomically.
    """
    rel_sn = np.asarray(rel_sn, dtype=np.float64)
    if (rel_sn <= 0).any():
        raise AnnaInputError("relative S/N must be positive", path=path, value=float(rel_sn.min()))
    _write_two_columns(path, "wavelength_A relative_sn", wavelengths, rel_sn, ".6f")


def write_wavelength_template(path, wavelengths):
    """Write a wavelength template (WAVE_TEMPLATE format): the grid and a solar-like synthetic flux.

    The flux column is not used by ANNA-TF; it makes the file a valid example spectrum on the grid
    (:data:`SOLAR_LABELS` through :func:`synthesize` at R = 11000).
    """
    wavelengths = np.asarray(wavelengths, dtype=np.float64).reshape(-1)
    flux = synthesize(wavelengths, np.asarray([SOLAR_LABELS]))[0]
    _write_two_columns(path, "wavelength_A flux (solar-like synthetic spectrum; flux unused)", wavelengths,
                       flux, ".6f")


def write_project_templates(folder):
    """(Re)write the templates shipped in ``templates/``: ``sn.hydra.template`` and ``wavelength.template``.

    ``sn.hydra.template``: :func:`fibre_relative_sn` on 6450-6850 A at 0.2 A; ``wavelength.template``:
    :func:`default_grid` with a solar-like flux.  Returns ``{"sn_template": path, "wavelength_template":
    path}``.
    """
    folder = Path(folder)
    sn_path = folder / "sn.hydra.template"
    wave_path = folder / "wavelength.template"
    sn_grid = _template_grid(SN_TEMPLATE_START, SN_TEMPLATE_START + SN_TEMPLATE_STEP * (SN_TEMPLATE_PIXELS - 1),
                             SN_TEMPLATE_STEP)
    write_sn_template(sn_path, sn_grid, fibre_relative_sn(sn_grid))
    write_wavelength_template(wave_path, default_grid())
    return {"sn_template": str(sn_path), "wavelength_template": str(wave_path)}


# ---------------------------------------------------------------------------------------------------------
# IRAF multispec output

WAT_CHARS_PER_CARD = 68
"""IRAF splits long WCS attribute strings (WATn_mmm) into cards holding exactly 68 characters each."""


def _wat_cards(axis, text):
    """Split ``text`` into the (keyword, value) cards WAT<axis>_001, _002, ... of 68 characters each."""
    return [(f"WAT{axis}_{number:03d}", text[start:start + WAT_CHARS_PER_CARD])
            for number, start in enumerate(range(0, len(text), WAT_CHARS_PER_CARD), start=1)]


def add_multispec_wcs(header, specs):
    """Write IRAF multispec world coordinates for a 2-D (apertures x pixels) image into ``header``.

    ``specs`` are the per-aperture attribute strings "ap beam dtype w1 dw nw z aplow aphigh [...]"; they go into
    WAT2 cards cut at IRAF's 68 characters.
    """
    header["WCSDIM"] = 2
    header["CTYPE1"] = "MULTISPE"
    header["CTYPE2"] = "MULTISPE"
    header["CD1_1"] = 1.0
    header["CD2_2"] = 1.0
    header["LTM1_1"] = 1.0
    header["LTM2_2"] = 1.0
    header["WAT0_001"] = "system=multispec"
    header["WAT1_001"] = "wtype=multispec label=Wavelength units=angstroms"
    wat2 = "wtype=multispec " + " ".join(f'spec{number} = "{spec}"' for number, spec in enumerate(specs, 1))
    for keyword, value in _wat_cards(2, wat2):
        header[keyword] = value


def _write_star_multispec(path, rng, star_labels, n_apertures, star_sn, resolution, grid):
    """Noisy spectra of one star as an IRAF multispec image (apertures x pixels), float32.

    Each aperture has its own linear dispersion (dtype 0): ``w1`` within +-0.6 A of ``grid[0] - 25 A``,
    ``dw`` = 0.9 x the grid step (times 1 +- 2e-4), and ``nw`` up to 12 pixels short of the image width, the
    rest zero-padded as IRAF does.  Noise is photon-like with S/N ``star_sn x`` :func:`fibre_relative_sn` at
    the continuum; each aperture also gets a residual radial velocity (uniform +-0.5 km/s) and a small
    continuum error (offset and tilt, sigma 0.5 %).  Returns the spec strings written into WAT2.
    """
    step = float(np.median(np.diff(grid)))
    base_w1 = float(grid[0]) - 25.0
    base_dw = 0.9 * step
    width = int(math.ceil((float(grid[-1]) + 25.0 - base_w1) / base_dw)) + 1
    specs, wave_rows, lengths = [], [], []
    for aperture in range(1, n_apertures + 1):
        w1_text = f"{base_w1 + rng.uniform(-0.6, 0.6):.4f}"
        dw_text = f"{base_dw * (1.0 + rng.normal(0.0, 2e-4)):.7f}"
        n_valid = width - int(rng.integers(0, 13))
        beam = aperture + (aperture - 1) // 10  # every eleventh fibre is a sky fibre, not extracted here
        centre = 8.0 + 21.5 * (aperture - 1)
        specs.append(f"{aperture} {beam} 0 {w1_text} {dw_text} {n_valid} 0. {centre - 2.5:.2f} {centre + 2.5:.2f}")
        wave_rows.append(float(w1_text) + float(dw_text) * np.arange(width))
        lengths.append(n_valid)
    wave = np.asarray(wave_rows)
    residual_rv = rng.uniform(-0.5, 0.5, n_apertures)
    flux = synthesize(wave, np.repeat(np.asarray([star_labels], dtype=np.float64), n_apertures, axis=0),
                      resolution=resolution, rv_kms=residual_rv)
    sigma = np.sqrt(np.maximum(flux, 0.0)) / (star_sn * fibre_relative_sn(wave))
    observed = flux + sigma * rng.standard_normal(flux.shape)
    tilt_axis = (wave - wave.mean()) / (0.5 * (wave.max() - wave.min()))
    continuum = 1.0 + rng.normal(0.0, 0.005, (n_apertures, 1)) + rng.normal(0.0, 0.005, (n_apertures, 1)) * tilt_axis
    observed *= continuum
    for row, n_valid in enumerate(lengths):
        observed[row, n_valid:] = 0.0

    from astropy.io import fits

    hdu = fits.PrimaryHDU(observed.astype(np.float32))
    header = hdu.header
    header["OBJECT"] = ("EXAMPLE STAR", "synthetic spectra of one star (anna.synth)")
    header["ORIGIN"] = "ANNA-TF example data generator"
    header["COMMENT"] = "Teaching-model spectra, not real data; true labels in star_labels.json."
    add_multispec_wcs(header, specs)
    for number, spec in enumerate(specs, start=1):
        fields = spec.split()
        header[f"APNUM{number}"] = f"{fields[0]} {fields[1]} {fields[7]} {fields[8]}"
    with atomic_output(path, "wb") as handle:
        hdu.writeto(handle)
    return specs


# ---------------------------------------------------------------------------------------------------------
# Example data set


def _positive_int(value, name, minimum=1):
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise AnnaInputError("must be an integer", key=name, value=value) from None
    if number != value or number < minimum:
        raise AnnaInputError(f"must be an integer >= {minimum}", key=name, value=value)
    return number


def make_example_data(outdir, *, seed=1, n_train=5000, n_xval=500, n_test=1000, grid=None,
                      resolution=11000.0, star_labels=(5770., 4.44, 0.0, 1.0, 3.0), n_apertures=90,
                      star_sn=200.0):
    """Write ANNA-TF's example data set into ``outdir`` and return ``{kind: path}``.

    Files (kinds in brackets): ``train.pack``, ``xval.pack``, ``test.pack`` [train, xval, test] — noise-free
    teaching-model spectra on ``grid`` (default :func:`default_grid`) at resolving power ``resolution``,
    labels (teff, logg, feh, vmic, vsini) uniform in :data:`DEFAULT_LABEL_RANGES`, each spectrum Doppler
    shifted by a residual velocity uniform in +-2 km/s that is stored in the dummy column; ids are 1..n_train,
    1000001.., 2000001.. so the three sets never share an id.  ``sn.template`` [sn_template]: relative S/N of
    the example fibre spectrograph (:func:`fibre_relative_sn`), 0.2 A steps covering 6450-6850 A and the grid.
    ``wavelength.template`` [wavelength_template]: ``grid`` with a solar-like flux.  ``star_multispec.fits``
    [multispec]: ``n_apertures`` noisy spectra of one star with labels ``star_labels`` at S/N ``star_sn`` x
    the S/N template, IRAF multispec format on per-aperture linear grids different from ``grid`` (see
    :func:`_write_star_multispec`).  ``star_labels.json`` [star_labels]: that star's true labels by name.

    Deterministic: the same arguments give byte-identical files.  Each product draws from its own random
    stream (spawned from ``seed``), so changing ``n_train`` does not change the test set or the star.
    """
    n_train = _positive_int(n_train, "n_train")
    n_xval = _positive_int(n_xval, "n_xval")
    n_test = _positive_int(n_test, "n_test")
    n_apertures = _positive_int(n_apertures, "n_apertures")
    seed = _positive_int(seed, "seed", minimum=0)
    star_sn = float(star_sn)
    if not (np.isfinite(star_sn) and star_sn > 0):
        raise AnnaInputError("must be a positive number", key="star_sn", value=star_sn)
    star = np.asarray(star_labels, dtype=np.float64).reshape(-1)
    if star.shape != (len(DEFAULT_LABEL_NAMES),):
        raise AnnaInputError(f"needs {len(DEFAULT_LABEL_NAMES)} values ({', '.join(DEFAULT_LABEL_NAMES)})",
                             key="star_labels", value=tuple(star_labels))
    _check_labels(star)
    grid = default_grid() if grid is None else np.asarray(grid, dtype=np.float64).reshape(-1)
    if grid.size < 2 or not np.isfinite(grid).all() or not (np.diff(grid) > 0).all() or grid[0] <= 0:
        raise AnnaInputError("grid must hold at least two positive, strictly ascending wavelengths", key="grid")

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    streams = [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(4)]
    written = {}
    for (kind, count, id_offset), rng in zip((("train", n_train, 0), ("xval", n_xval, 1_000_000),
                                              ("test", n_test, 2_000_000)), streams):
        labels = draw_labels(count, rng)
        residual_rv = rng.uniform(-RESIDUAL_RV_KMS, RESIDUAL_RV_KMS, count)
        flux = np.empty((count, grid.size))
        for start in range(0, count, 2000):
            stop = min(start + 2000, count)
            flux[start:stop] = synthesize(grid, labels[start:stop], resolution=resolution,
                                          rv_kms=residual_rv[start:stop])
        path = outdir / f"{kind}.pack"
        write_pack(path, grid, id_offset + np.arange(1, count + 1), labels, flux, dummy=residual_rv)
        written[kind] = str(path)

    sn_grid = _template_grid(min(SN_TEMPLATE_START, math.floor(grid[0]) - 25.0),
                             max(SN_TEMPLATE_START + SN_TEMPLATE_STEP * (SN_TEMPLATE_PIXELS - 1),
                                 math.ceil(grid[-1]) + 25.0), SN_TEMPLATE_STEP)
    written["sn_template"] = str(outdir / "sn.template")
    write_sn_template(written["sn_template"], sn_grid, fibre_relative_sn(sn_grid))
    written["wavelength_template"] = str(outdir / "wavelength.template")
    write_wavelength_template(written["wavelength_template"], grid)

    written["multispec"] = str(outdir / "star_multispec.fits")
    _write_star_multispec(written["multispec"], streams[3], star, n_apertures, star_sn, resolution, grid)
    written["star_labels"] = str(outdir / "star_labels.json")
    with atomic_output(written["star_labels"], "w", encoding="utf-8") as handle:
        json.dump({name: float(value) for name, value in zip(DEFAULT_LABEL_NAMES, star)}, handle, indent=2)
        handle.write("\n")
    return written


# ---------------------------------------------------------------------------------------------------------
# Packs from real spectra (anna-pack)

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz")
LARGEST_EXACT_ID = 2 ** 53
"""Integers up to this size survive as float64 pack ids; larger ones (e.g. Gaia source_id) do not."""


def _spectrum_stem(path):
    """File name without directory and without the FITS or text suffix ('a/b/x.fits.gz' -> 'x')."""
    name = os.path.basename(os.fspath(path))
    lower = name.lower()
    for suffix in FITS_SUFFIXES:
        if lower.endswith(suffix):
            return name[:-len(suffix)]
    return os.path.splitext(name)[0]


def _read_one_spectrum(path):
    """(wavelength, flux) of the single spectrum in a text or FITS file, sorted by wavelength."""
    if os.fspath(path).lower().endswith(FITS_SUFFIXES):
        from anna.fits_io import read_spectra

        spectra = read_spectra(path)
        if len(spectra) != 1:
            raise AnnaInputError(f"file holds {len(spectra)} spectra; a pack row needs exactly one spectrum per "
                                 "file (split multispec files with anna-spectra --text first)", path=path)
        wave = np.asarray(spectra[0].wavelength, dtype=np.float64)
        flux = np.asarray(spectra[0].flux, dtype=np.float64)
        good = np.isfinite(wave) & np.isfinite(flux)
        wave, flux = wave[good], flux[good]
    else:
        wave, flux = read_two_columns(path, "spectrum", ascending=False)
    order = np.argsort(wave, kind="stable")
    wave, flux = wave[order], flux[order]
    if wave.size < 2 or (np.diff(wave) == 0).any():
        raise AnnaInputError("spectrum wavelengths must be distinct (repeated wavelength found)", path=path)
    return wave, flux


def _read_label_table(labels_csv, id_column, label_columns):
    """Rows of the labels CSV as (line number, dict); checks that the needed columns exist."""
    try:
        with open(labels_csv, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            fields = [name.strip() for name in (reader.fieldnames or [])]
            rows = []
            for row in reader:
                rows.append((reader.line_num, {key.strip(): (value or "").strip()
                                               for key, value in row.items() if key is not None}))
    except FileNotFoundError:
        raise AnnaInputError("labels CSV does not exist", path=labels_csv) from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise AnnaInputError(f"cannot read labels CSV: {exc}", path=labels_csv) from None
    if not fields:
        raise AnnaInputError("labels CSV has no header row", path=labels_csv)
    has_file = "file" in fields
    if not has_file and id_column not in fields:
        raise AnnaInputError(f"labels CSV needs a '{id_column}' column (or a 'file' column) to match spectra to "
                             f"rows; columns are {', '.join(fields)}", path=labels_csv, key=id_column)
    if label_columns is None:
        label_columns = [name for name in fields if name not in (id_column, "file")]
    label_columns = [str(name).strip() for name in label_columns]
    if not label_columns:
        raise AnnaInputError("labels CSV has no label columns besides the id/file columns", path=labels_csv)
    for name in label_columns:
        if name not in fields:
            raise AnnaInputError(f"label column missing; columns are {', '.join(fields)}", path=labels_csv,
                                 key=name)
    return rows, has_file, label_columns


def _numeric_id(text):
    """The id as float64 if it survives exactly, else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    stripped = text.lstrip("+-")
    if stripped.isdigit() and int(stripped) > LARGEST_EXACT_ID:
        return None
    return value


def build_pack_from_spectra(spectra_paths, labels_csv, grid, out_path, *, id_column="star_id",
                            label_columns=None):
    """Build a training pack from spectrum files and a CSV of labels (``anna-pack``); returns ``out_path``.

    ``spectra_paths``: files, each holding ONE spectrum: two-column text (wavelength in Angstrom, flux;
    whitespace or comma separated, ``#`` comments) or FITS (``.fits``/``.fit``/``.fts``, optionally ``.gz``,
    read with :func:`anna.fits_io.read_spectra`).  ``labels_csv``: a header row, then one row per spectrum.
    A spectrum is matched to its row by the CSV's ``file`` column when there is one (equal to the file's
    path as given, its name, or its stem, i.e. the name without suffix), otherwise by its stem equal to the
    ``id_column`` value.  ``label_columns``: the label columns in pack order (default: every column but
    ``id_column`` and ``file``, in CSV order); an empty cell or ``nan`` is a missing label (NaN).
    ``grid`` (npix,): wavelengths of the pack; each spectrum is linearly interpolated onto it and must cover
    it (no extrapolation).  Pack ids: the ``id_column`` values when all are numbers that float64 holds
    exactly; otherwise 1..n in the order of ``spectra_paths``, with ``<out_path>.ids.csv`` mapping each
    pack id to its file and CSV id.  Problems raise :class:`AnnaInputError` naming the file, line or column.
    """
    spectra_paths = [os.fspath(path) for path in spectra_paths]
    if not spectra_paths:
        raise AnnaInputError("no spectrum files given")
    grid = np.asarray(grid, dtype=np.float64).reshape(-1)
    if grid.size < 2 or not np.isfinite(grid).all() or not (np.diff(grid) > 0).all():
        raise AnnaInputError("grid must hold at least two finite, strictly ascending wavelengths", key="grid")
    labels_csv = os.fspath(labels_csv)
    rows, has_file, label_columns = _read_label_table(labels_csv, id_column, label_columns)

    index = {}
    for line, row in rows:
        key = row.get("file") if has_file else row.get(id_column)
        if not key:
            raise AnnaInputError("row has an empty matching value", path=labels_csv, line=line,
                                 key="file" if has_file else id_column)
        if key in index:
            raise AnnaInputError(f"duplicate row (also on line {index[key][0]})", path=labels_csv, line=line,
                                 key="file" if has_file else id_column, value=key)
        index[key] = (line, row)

    matched, used = [], {}
    for path in spectra_paths:
        candidates = [path, os.path.basename(path), _spectrum_stem(path)] if has_file else [_spectrum_stem(path)]
        hit = next((index[name] for name in candidates if name in index), None)
        if hit is None:
            raise AnnaInputError(f"no row of {labels_csv} matches this spectrum (looked for "
                                 f"{' or '.join(repr(name) for name in dict.fromkeys(candidates))} in column "
                                 f"'{'file' if has_file else id_column}')", path=path)
        if hit[0] in used:
            raise AnnaInputError(f"matches CSV line {hit[0]}, already used by {used[hit[0]]}", path=path)
        used[hit[0]] = path
        matched.append(hit)

    labels = np.empty((len(spectra_paths), len(label_columns)))
    for star, (line, row) in enumerate(matched):
        for column, name in enumerate(label_columns):
            text = row.get(name, "")
            if text == "" or text.lower() == "nan":
                labels[star, column] = np.nan
                continue
            try:
                labels[star, column] = float(text)
            except ValueError:
                raise AnnaInputError("label is not a number", path=labels_csv, line=line, key=name,
                                     value=text) from None
            if not math.isfinite(labels[star, column]):
                raise AnnaInputError("label is infinite", path=labels_csv, line=line, key=name, value=text)

    flux = np.empty((len(spectra_paths), grid.size))
    for star, path in enumerate(spectra_paths):
        wave, values = _read_one_spectrum(path)
        tolerance = 1e-9 * float(grid[-1])
        if wave[0] > grid[0] + tolerance or wave[-1] < grid[-1] - tolerance:
            raise AnnaInputError(f"spectrum covers {wave[0]:.3f}-{wave[-1]:.3f} A but the grid needs "
                                 f"{grid[0]:.3f}-{grid[-1]:.3f} A; spectra are never extrapolated", path=path)
        flux[star] = cubic_resample(wave, values, grid)

    id_texts = [row.get(id_column, "") for _, row in matched]
    numeric = [_numeric_id(text) for text in id_texts]
    out_path = os.fspath(out_path)
    if all(value is not None for value in numeric):
        ids = np.asarray(numeric, dtype=np.float64)
        if os.path.exists(out_path + ".ids.csv"):
            os.remove(out_path + ".ids.csv")  # a stale map from an earlier build would now be wrong
    else:
        ids = np.arange(1, len(spectra_paths) + 1, dtype=np.float64)
        with atomic_output(out_path + ".ids.csv", "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["pack_id", "file", id_column])
            for number, (path, text) in enumerate(zip(spectra_paths, id_texts), start=1):
                writer.writerow([number, path, text])
    write_pack(out_path, grid, ids, labels, flux)
    return out_path
