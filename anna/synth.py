"""Example data for ANNA-TF: a teaching model of stellar line spectra.

ANNA's tutorial relied on a download that no longer exists.  This module makes equivalent data on the spot so
the whole pipeline (train, test, infer on a multispec FITS file) runs out of the box.  (Packs from real
spectra are :mod:`anna.packer`'s job, ``anna-pack``.)

**This is a teaching model, not radiative transfer.**  There is no model atmosphere, no depth dependence and
no line-by-line solution of the transfer equation.  What it keeps is the way each label leaves its signature
on a continuum-normalised spectrum, so that a network trained on it has to learn the same cues it would learn
from real spectra:

* **Line list.**  58 real atomic lines between 6590 and 6860 A (Fe I, Ni I, Ca I, Si I, Ti I, Co I, Al I,
  Li I; Sc II, Y II, Eu II) with laboratory wavelengths and approximate excitation potentials and log gf
  values.  Molecules and H alpha (6563 A, outside the window) are left out; lithium keeps the solar abundance.
  (Survey-size grids use a far larger list: see *Survey line list* below.)
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

**Survey line list** (``synthesize(..., line_list="survey")``; ``anna-synth --grid apogee|lamost``).  The
58 lines only cover the tutorial window, so for survey-size spectra (:func:`apogee_grid`, the H band at
R = 22500; :func:`lamost_grid`, 3700-9100 A at R = 1800) the model takes a denser list
(:func:`survey_line_table`, 7298 lines).  Real line lists (VALD, NIST) cannot be shipped here, so most of it
is a deterministic pseudo-line list drawn with a fixed seed, built around real lines:

* *Real lines* kept as such: the tutorial's 58 (the only lines in 6590-6860 A, so that region looks as
  before), 187 strong optical and H-band lines (:data:`STRONG_LINES`: Ca II H, K and triplet, Mg I b, Na D,
  K I, Ca I 4227, O I 7772-5, Sr II, Ba II, strong Fe I/II; the APOGEE lines of K, Mn, Na, Al, Ca, Mg, Si, Ti,
  C, S, Cr, Co, Ni, Fe), with approximate atomic data.
* *Hydrogen*: Balmer (H alpha to H22) and Brackett (Br 10 to Br 26) lines from the Rydberg formula and
  Kramers oscillator strengths, with Stark damping growing with the electron pressure and with
  ``n_upper^2 - n_lower^2``.  Their wings form deep in the atmosphere, which this model has not, so their
  temperature sensitivity and Brackett strengths are set by hand (:data:`HYDROGEN_SERIES`): H alpha has about
  1, 4 and 8 A at 4000, 5800 and 7000 K, nearly whatever the gravity; Brackett lines are broad, shallow,
  stronger in hot stars and in giants.  The profile (Gaussian core, Lorentz wings) is a Voigt stand-in for
  the Stark profile: broad and roughly right, not exact.
* *Pseudo atomic lines* (:data:`PSEUDO_REGIONS`): 4500 in the optical, denser to the blue (lines per A
  ~ lambda^-4), 1000 in the H band; species and excitation potentials drawn from per-region mixes that
  mimic real lists (Fe I about half; Ti, Cr, Ni, V, Co, Mn, Ca, Fe II, Ti II, Sc II in the optical,
  high-excitation Fe, Si, Mg, Ni, C I, S I in the H band).  Each line's solar weak-line width is drawn from
  dN/dlog W ~ W^-0.3 (1-200 mA), and its log gf is whatever gives that width in the Sun under this model:
  the Sun gets a realistic spread of line strengths and every other star follows the physics above.
* *Molecules* (:data:`MOLECULES`): CO (second-overtone band heads), OH and CN (forests) in the H band; CN
  violet, CH (G band), MgH and TiO bands in the optical, as lines whose strength follows a dissociation
  equilibrium (``10**(theta D)``, gas pressure, both constituents' abundances, the minority element
  saturating into the molecule as carbon does into CO) and a rotational Boltzmann factor.  Molecular lines
  are strong in cool stars, weak or absent in hot ones.
* *Continuum*: the H- opacity's wavelength dependence (:data:`CONTINUUM_SHAPE`; lowest at 1.64 micron).

The labels keep their signatures: Teff through excitation (atomic and rotational), molecules and hydrogen;
log g through ionisation balance, pressure-broadened wings (Mg I b, Na D, Ca II) and the Brackett lines;
[Fe/H] through line strengths (in molecules through both constituents); vmic through saturated lines; vsini
through line widths (at LAMOST's R = 1800 vsini below 40 km/s barely shows, as in real LAMOST spectra).
Survey mode also computes wide grids in segments, adds far wings in closed form and lets deep blends
saturate smoothly (:func:`_synthesize_survey`).  All wavelengths are in air, the survey grids included
(:func:`apogee_grid`).

Example-data products (:func:`make_example_data`): ``train.pack``, ``xval.pack``, ``test.pack`` (noise-free,
labels uniform in :data:`DEFAULT_LABEL_RANGES`, each spectrum shifted by a small residual radial velocity
drawn uniformly in +-2 km/s and stored in the pack's dummy column, so a network learns to tolerate imperfect
velocity correction), ``sn.template`` and ``wavelength.template``, ``star_multispec.fits`` (noisy spectra of
one star in IRAF multispec format on a different, per-aperture linear grid) and ``star_labels.json``.
"""

import functools
import json
import math
from pathlib import Path

import numpy as np
from scipy import fft as scipy_fft
from scipy import special

from anna.atomic import atomic_output
from anna.errors import AnnaInputError
from anna.fits_io import add_multispec_wcs
from anna.packs import write_pack

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

LINE_LISTS = ("tutorial", "survey")
"""Line lists :func:`synthesize` knows (see its ``line_list`` argument)."""

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

    log_pg_shift = 0.6 * (logg - 4.44) + 2.5 * (theta_eff - THETA_SUN) - 0.3 * feh
    gamma_total = (10.0 ** LOG_GAMMA_RAD
                   + 10.0 ** (LOG_GAMMA_VDW_SUN + GAMMA_VDW_CHI_SLOPE * lines["chi_exc"] + log_pg_shift))
    gamma_kms = gamma_total * wavelength * 1e-13 / (4.0 * math.pi)  # Lorentz HWHM, km/s
    return _curve_of_growth(w0, b, gamma_kms)


def _curve_of_growth(w0, b, gamma_kms, d_max=MAX_CENTRAL_DEPTH):
    """Equivalent width and profile of lines of weak-line width ``w0``, Doppler parameter ``b`` and Lorentz
    half width ``gamma_kms`` (arrays in km/s, broadcast together) whose centres cannot get deeper than
    ``d_max``: ``(W, b_profile, gamma_profile)``."""
    tau0 = np.maximum(w0 / (math.sqrt(math.pi) * b), 1e-30)  # floor: vanishing lines stay finite
    damping = gamma_kms / b

    # Slab curve of growth with a largest central depth: tau' = tau0 / d_max keeps the weak-line limit and
    # lets lines saturate at the residual flux of real strong lines (Minnaert's picture).
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


def synthesize(wavelengths, labels, *, resolution=11000.0, rv_kms=None, line_list="tutorial"):
    """Continuum-normalised spectra of the teaching model (see the module docstring).

    ``wavelengths``: (npix,) ascending air wavelengths in Angstrom shared by all spectra, or (n, npix) one grid
    per spectrum.  ``labels``: (n, 5) teff (K), logg (cgs dex), [Fe/H] (dex), vmic (km/s), vsini (km/s).
    ``resolution``: resolving power R = lambda / FWHM of the Gaussian instrumental profile.  ``rv_kms``:
    (n,) radial velocities in km/s (positive = redshift, lambda_obs = lambda (1 + v/c)), or None for zero.
    ``line_list``: ``"tutorial"`` (default) uses the 58 real lines of :data:`LINE_LIST` only, so spectra
    outside 6590-6860 A are bare continuum; ``"survey"`` uses :func:`survey_line_table`, which covers
    3700-9100 A and the H band (see :func:`_synthesize_survey` for what else that mode adds).
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
    if line_list not in LINE_LISTS:
        raise AnnaInputError(f"line_list must be one of {', '.join(LINE_LISTS)}", key="line_list",
                             value=line_list)

    c = SPEED_OF_LIGHT_KMS
    sigma_instrument = c / resolution / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    velocity_shift = c * np.log1p(rv / c)
    margin = 300.0 + 2.0 * float(labels[:, 4].max()) + 2.0 * float(np.abs(velocity_shift).max()) \
        + 8.0 * sigma_instrument
    if line_list == "survey":
        # a margin that does not depend on the other stars of the call, up to vsini 40 km/s and |rv| 10 km/s
        margin = 300.0 + 2.0 * max(float(labels[:, 4].max()), SURVEY_VSINI_ALLOWANCE) \
            + 2.0 * max(float(np.abs(velocity_shift).max()), SURVEY_SHIFT_ALLOWANCE) + 8.0 * sigma_instrument
        return _synthesize_survey(wave, labels, velocity_shift, sigma_instrument, margin)

    def tutorial_lines(wave_min, wave_max):
        lines = _line_table(wave_min, wave_max)
        if not len(lines["wavelength"]):
            return lines["wavelength"], None, None, None
        return (lines["wavelength"],) + _line_parameters(labels, lines)

    return np.maximum(1.0 - _box_depth(wave, labels, velocity_shift, sigma_instrument, margin, tutorial_lines),
                      0.0)


def _box_depth(wave, labels, velocity_shift, sigma_instrument, margin, select_lines, split_terms=False):
    """Depth below the continuum (n, npix) of the lines near ``wave``, broadened and shifted, unfloored.

    One periodic velocity box covers the pixels plus ``2 margin`` on each side; ``select_lines(wave_min,
    wave_max)`` returns the lines within ``margin`` of the pixels as ``(wavelength (m,), width, b_profile,
    gamma_profile)``, the last three (n, m) arrays from :func:`_line_parameters` (or None when m = 0).
    ``margin`` must exceed the reach of the broadening kernels (8 sigma, 2 vsini, 2 |shift|) so nothing
    wraps around the box onto the pixels.  ``split_terms`` gives each group of lines needing about the same
    number of Chebyshev terms its own series (faster when a few lines are much broader than the rest).
    """
    n_stars = labels.shape[0]
    c = SPEED_OF_LIGHT_KMS
    reference = float(wave.min())
    pixel_velocity = c * np.log(wave / reference)  # (npix,) or (n, npix), >= 0
    span = float(pixel_velocity.max())
    box_start = -2.0 * margin
    box_length = span + 4.0 * margin
    line_wavelength, width, b_profile, gamma_profile = select_lines(reference * math.exp(-margin / c),
                                                                    reference * math.exp((span + margin) / c))
    line_velocity = c * np.log(line_wavelength / reference) - box_start

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
    if not len(line_velocity):
        groups = []
    elif split_terms:
        # Survey mode: lines grouped by the number of terms they need (few broad lines, Brackett or strong
        # saturated ones, would otherwise set the series length, and the cost, for all).
        need = 12.0 + 2.4 * math.pi * b_profile.max(axis=0) * k_top + 0.6 * math.pi * gamma_profile.max(axis=0) * k_top
        bucket = np.ceil(need / TERM_BUCKET)
        groups = [np.flatnonzero(bucket == value) for value in np.unique(bucket)]
    else:
        groups = [slice(None)]
    series = []
    for members in groups:
        # Terms for an absolute error below 1e-8 of each line's area (found numerically for
        # exp(-X t^2 - Y t) on [0, 1]): wide, saturated profiles at high resolution need more.
        widest = (math.pi * float(b_profile[:, members].max()) * k_top) ** 2
        damped = 2.0 * math.pi * float(gamma_profile[:, members].max()) * k_top
        n_terms = int(math.ceil(12.0 + 2.4 * math.sqrt(widest) + 0.3 * damped))
        node_angle = math.pi * (np.arange(n_terms) + 0.5) / n_terms
        k_nodes = 0.5 * k_top * (1.0 + np.cos(node_angle))
        node_to_coefficient = (2.0 / n_terms) * np.cos(np.outer(node_angle, np.arange(n_terms)))
        node_to_coefficient[:, 0] *= 0.5
        chebyshev = np.cos(np.outer(np.arange(n_terms), np.arccos(np.clip(2.0 * k / k_top - 1.0, -1.0, 1.0))))
        phase = -2.0 * math.pi * line_velocity[members, None] * k[None, :]
        basis_cos = (np.cos(phase)[:, None, :] * chebyshev[None, :, :]).reshape(-1, n_freq)
        basis_sin = (np.sin(phase)[:, None, :] * chebyshev[None, :, :]).reshape(-1, n_freq)
        series.append((members, k_nodes, node_to_coefficient, basis_cos, basis_sin))

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

    depths = np.empty((n_stars, wave.shape[-1]), dtype=np.float64)
    chunk = max(1, min(n_stars, 2_000_000 // n_grid))
    for start in range(0, n_stars, chunk):
        stop = min(start + chunk, n_stars)
        part = labels[start:stop]
        absorption = np.zeros((stop - start, n_freq), dtype=np.complex128)
        for number, (members, k_nodes, node_to_coefficient, basis_cos, basis_sin) in enumerate(series):
            at_nodes = np.exp(-(math.pi * b_profile[start:stop, members, None] * k_nodes) ** 2
                              - 2.0 * math.pi * gamma_profile[start:stop, members, None] * k_nodes)
            coefficients = (at_nodes @ node_to_coefficient) * width[start:stop, members, None]
            coefficients = coefficients.reshape(stop - start, -1)
            if number == 0:
                absorption.real = coefficients @ basis_cos
                absorption.imag = coefficients @ basis_sin
            else:
                absorption.real += coefficients @ basis_cos
                absorption.imag += coefficients @ basis_sin
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
        depths[start:stop] = sampled
    return depths


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
# Survey line list (synthesize(..., line_list="survey"))

SURVEY_LINE_SEED = 20120612
"""Seed of the pseudo-line draws: the survey line list is the same on every machine and in every run."""

# element: (atomic mass u, A(X), first ionisation energy eV, u_I, u_II, alpha?) like ELEMENTS, for the species
# the survey list adds.  Partition functions are again rough constants for 5000-6000 K.
SURVEY_ELEMENTS = {
    **ELEMENTS,
    "H": (1.008, 12.00, 13.598, 2.0, 1.0, False),
    "C": (12.011, 8.43, 11.260, 9.3, 5.9, False),
    "N": (14.007, 7.83, 14.534, 4.1, 8.9, False),
    "O": (15.999, 8.69, 13.618, 8.8, 4.0, True),
    "Na": (22.99, 6.24, 5.139, 2.2, 1.0, False),
    "Mg": (24.305, 7.60, 7.646, 1.03, 2.0, True),
    "S": (32.06, 7.12, 10.360, 8.5, 4.2, True),
    "K": (39.098, 5.03, 4.341, 2.5, 1.0, False),
    "V": (50.942, 3.93, 6.746, 35.0, 30.0, False),
    "Cr": (51.996, 5.64, 6.767, 8.0, 6.2, False),
    "Mn": (54.938, 5.43, 7.434, 6.2, 7.3, False),
    "Sr": (87.62, 2.87, 5.695, 1.3, 2.1, False),
    "Ba": (137.33, 2.18, 5.212, 2.6, 3.2, False),
}

# molecule: (mass u, dissociation energy eV, minority element, partner element, log10 x in the Sun), where x is
# the ratio of molecules to free atoms of the minority element in the Sun's line-forming layers (only its
# size relative to 1 matters: it sets where the minority element runs out, as carbon does into CO in cool
# stars).
MOLECULES = {
    "CO": (28.01, 11.09, "C", "O", -0.5),
    "OH": (17.007, 4.39, "O", "H", -3.5),
    "CN": (26.018, 7.72, "N", "C", -3.0),
    "CH": (13.019, 3.47, "C", "H", -3.5),
    "MgH": (25.313, 1.34, "Mg", "H", -4.0),
    "TiO": (63.87, 6.87, "Ti", "O", -2.5),
}

# Real lines outside the tutorial window, air wavelengths (A), species, lower excitation potential (eV),
# log gf: the strong lines that shape survey spectra (Ca II H, K and the infrared triplet, Mg I b, Na D,
# K I, Ca I 4227, the O I triplet, strong Fe I/Fe II, Sr II, Ba II...) and well-known H-band lines of APOGEE
# elements (K, Mn, Na, Al, Ca, Mg, Si, Ti, C, S, Cr, Co, Ni, Fe).  Atomic data are approximate literature
# values, not taken from a line database: good enough for a teaching model, not for analysing real spectra.
STRONG_LINES = (
    # optical
    (3820.425, "Fe I", 0.859, 0.119), (3829.355, "Mg I", 2.709, -0.227), (3832.304, "Mg I", 2.712, 0.270),
    (3838.292, "Mg I", 2.717, 0.490), (3859.911, "Fe I", 0.000, -0.710), (3886.282, "Fe I", 0.052, -1.076),
    (3905.523, "Si I", 1.909, -1.090), (3933.663, "Ca II", 0.000, 0.134), (3944.006, "Al I", 0.000, -0.638),
    (3961.520, "Al I", 0.014, -0.336), (3968.469, "Ca II", 0.000, -0.166), (4030.753, "Mn I", 0.000, -0.480),
    (4033.062, "Mn I", 0.000, -0.618), (4034.483, "Mn I", 0.000, -0.811), (4045.812, "Fe I", 1.485, 0.280),
    (4057.505, "Mg I", 4.346, -0.900), (4063.594, "Fe I", 1.557, 0.062), (4071.738, "Fe I", 1.608, -0.022),
    (4077.709, "Sr II", 0.000, 0.151), (4167.271, "Mg I", 4.346, -0.710), (4215.519, "Sr II", 0.000, -0.173),
    (4226.728, "Ca I", 0.000, 0.244), (4233.172, "Fe II", 2.583, -1.809), (4246.822, "Sc II", 0.315, 0.242),
    (4254.332, "Cr I", 0.000, -0.114), (4274.796, "Cr I", 0.000, -0.231), (4289.716, "Cr I", 0.000, -0.361),
    (4383.545, "Fe I", 1.485, 0.200), (4404.750, "Fe I", 1.557, -0.142), (4454.779, "Ca I", 1.899, 0.260),
    (4501.270, "Ti II", 1.116, -0.770), (4533.960, "Ti II", 1.237, -0.530), (4554.029, "Ba II", 0.000, 0.170),
    (4563.757, "Ti II", 1.221, -0.690), (4571.096, "Mg I", 0.000, -5.623), (4571.971, "Ti II", 1.572, -0.320),
    (4583.837, "Fe II", 2.807, -1.930), (4702.991, "Mg I", 4.346, -0.440), (4883.684, "Y II", 1.084, 0.070),
    (4891.492, "Fe I", 2.851, -0.112), (4920.503, "Fe I", 2.833, 0.068), (4923.927, "Fe II", 2.891, -1.320),
    (4934.076, "Ba II", 0.000, -0.150), (4957.596, "Fe I", 2.808, 0.233), (4981.731, "Ti I", 0.848, 0.560),
    (4982.814, "Na I", 2.104, -0.916), (4991.065, "Ti I", 0.836, 0.440), (4999.503, "Ti I", 0.826, 0.310),
    (5018.440, "Fe II", 2.891, -1.220), (5167.321, "Mg I", 2.709, -0.870), (5169.033, "Fe II", 2.891, -1.250),
    (5172.684, "Mg I", 2.712, -0.393), (5183.604, "Mg I", 2.717, -0.167), (5192.969, "Ti I", 0.021, -0.950),
    (5204.506, "Cr I", 0.941, -0.208), (5206.038, "Cr I", 0.941, 0.019), (5208.419, "Cr I", 0.941, 0.158),
    (5210.385, "Ti I", 0.048, -0.820), (5232.940, "Fe I", 2.940, -0.058), (5234.625, "Fe II", 3.221, -2.180),
    (5269.537, "Fe I", 0.859, -1.321), (5316.615, "Fe II", 3.153, -1.870), (5324.179, "Fe I", 3.211, -0.103),
    (5328.039, "Fe I", 0.915, -1.466), (5371.489, "Fe I", 0.958, -1.645), (5397.128, "Fe I", 0.915, -1.993),
    (5405.775, "Fe I", 0.990, -1.844), (5429.696, "Fe I", 0.958, -1.879), (5446.917, "Fe I", 0.990, -1.910),
    (5526.790, "Sc II", 1.768, 0.024), (5528.405, "Mg I", 4.346, -0.498), (5588.749, "Ca I", 2.526, 0.210),
    (5682.633, "Na I", 2.102, -0.706), (5688.205, "Na I", 2.104, -0.452), (5708.400, "Si I", 4.954, -1.370),
    (5711.088, "Mg I", 4.346, -1.724), (5772.146, "Si I", 5.082, -1.653), (5853.668, "Ba II", 0.604, -1.010),
    (5857.451, "Ca I", 2.933, 0.240), (5889.951, "Na I", 0.000, 0.117), (5895.924, "Na I", 0.000, -0.184),
    (5948.541, "Si I", 5.082, -1.130), (6021.819, "Mn I", 3.075, 0.034), (6102.723, "Ca I", 1.879, -0.793),
    (6122.217, "Ca I", 1.886, -0.316), (6136.615, "Fe I", 2.453, -1.400), (6141.713, "Ba II", 0.704, -0.077),
    (6149.258, "Fe II", 3.889, -2.720), (6154.226, "Na I", 2.102, -1.547), (6155.134, "Si I", 5.619, -0.754),
    (6160.747, "Na I", 2.104, -1.246), (6162.173, "Ca I", 1.899, -0.090), (6166.439, "Ca I", 2.521, -1.142),
    (6169.042, "Ca I", 2.523, -0.797), (6169.563, "Ca I", 2.526, -0.478), (6191.558, "Fe I", 2.433, -1.417),
    (6230.723, "Fe I", 2.559, -1.281), (6247.557, "Fe II", 3.892, -2.430), (6252.555, "Fe I", 2.404, -1.687),
    (6393.601, "Fe I", 2.433, -1.432), (6400.001, "Fe I", 3.602, -0.290), (6430.846, "Fe I", 2.176, -2.006),
    (6432.680, "Fe II", 2.891, -3.570), (6439.075, "Ca I", 2.526, 0.390), (6449.808, "Ca I", 2.521, -0.502),
    (6455.598, "Ca I", 2.523, -1.340), (6456.383, "Fe II", 3.903, -2.050), (6471.662, "Ca I", 2.526, -0.686),
    (6493.781, "Ca I", 2.521, -0.109), (6494.980, "Fe I", 2.404, -1.273), (6496.897, "Ba II", 0.604, -0.377),
    (6516.080, "Fe II", 2.891, -3.310), (7405.772, "Si I", 5.614, -0.820), (7415.948, "Si I", 5.610, -0.730),
    (7423.496, "Si I", 5.619, -0.580), (7664.899, "K I", 0.000, 0.135), (7698.965, "K I", 0.000, -0.168),
    (7771.944, "O I", 9.146, 0.369), (7774.166, "O I", 9.146, 0.223), (7775.388, "O I", 9.146, 0.002),
    (7835.309, "Al I", 4.022, -0.689), (7836.134, "Al I", 4.022, -0.534), (8183.256, "Na I", 2.102, 0.237),
    (8194.824, "Na I", 2.104, 0.492), (8327.052, "Fe I", 2.198, -1.525), (8387.773, "Fe I", 2.176, -1.493),
    (8498.023, "Ca II", 1.692, -1.312), (8542.091, "Ca II", 1.700, -0.362), (8662.141, "Ca II", 1.692, -0.623),
    (8688.624, "Fe I", 2.176, -1.212), (8736.019, "Mg I", 5.946, -0.340), (8772.866, "Al I", 4.022, -0.380),
    (8773.897, "Al I", 4.022, -0.210), (8806.757, "Mg I", 4.346, -0.137), (8824.221, "Fe I", 2.198, -1.540),
    # H band
    (15159.04, "Mn I", 4.889, 0.620), (15163.07, "K I", 2.670, 0.630), (15168.38, "K I", 2.670, 0.480),
    (15194.49, "Fe I", 2.223, -4.780), (15207.53, "Fe I", 5.385, 0.080), (15217.74, "Mn I", 4.889, 0.520),
    (15262.40, "Mn I", 4.889, 0.390), (15395.72, "Fe I", 5.621, -0.340), (15469.82, "S I", 8.046, -0.050),
    (15478.48, "S I", 8.046, 0.180), (15490.34, "Fe I", 2.198, -4.810), (15543.76, "Ti I", 1.879, -1.120),
    (15602.84, "Ti I", 2.267, -1.700), (15621.65, "Fe I", 5.539, 0.260), (15648.52, "Fe I", 5.426, -0.700),
    (15680.06, "Cr I", 4.697, 0.150), (15698.98, "Ti I", 1.887, -2.050), (15715.57, "Ti I", 1.873, -1.250),
    (15740.72, "Mg I", 5.931, -0.210), (15748.99, "Mg I", 5.932, 0.140), (15765.84, "Mg I", 5.933, 0.410),
    (15860.21, "Cr I", 4.697, 0.000), (15879.52, "Mg I", 5.946, -1.250), (15886.26, "Mg I", 5.946, -1.600),
    (15888.41, "Si I", 5.082, -1.830), (15954.48, "Mg I", 6.588, -0.800), (15960.06, "Si I", 6.100, 0.200),
    (15964.87, "Fe I", 5.921, -0.130), (16004.91, "C I", 9.631, 0.370), (16009.62, "Fe I", 5.430, -0.690),
    (16021.72, "C I", 9.631, 0.120), (16040.66, "Fe I", 5.874, 0.070), (16060.01, "Si I", 5.954, -0.450),
    (16094.79, "Si I", 5.964, -0.170), (16150.76, "Ca I", 4.532, -0.290), (16153.25, "Fe I", 5.350, -0.740),
    (16155.24, "Ca I", 4.532, -0.740), (16157.36, "Ca I", 4.554, -0.220), (16197.07, "Ca I", 4.535, 0.090),
    (16215.67, "Si I", 5.954, -0.630), (16373.86, "Na I", 3.753, -1.800), (16388.85, "Na I", 3.753, -1.510),
    (16584.40, "Ni I", 5.300, -0.500), (16673.70, "Ni I", 6.030, 0.100), (16680.77, "Si I", 5.984, -0.140),
    (16718.96, "Al I", 4.085, 0.290), (16750.56, "Al I", 4.087, 0.550), (16757.64, "Co I", 3.409, -1.000),
    (16763.36, "Al I", 4.087, -0.520), (16815.47, "Ni I", 5.305, -0.600), (16828.16, "Si I", 5.984, -1.000),
    (16890.38, "C I", 9.003, 0.400),
)

# Pseudo atomic lines.  Per region: (first, last wavelength A, number of lines, density exponent p with
# lines per A ~ lambda**-p, log10 range of the solar weak-line width in mA, slope s of dN/dlog W ~ W**-s,
# species mix as (species, weight, mean, sd, min, max of the excitation potential in eV)).
PSEUDO_REGIONS = (
    (3650.0, 9150.0, 4500, 4.0, (0.0, 2.3), 0.3, (
        ("Fe I", 0.40, 3.2, 1.2, 0.0, 5.5), ("Fe II", 0.05, 3.3, 0.6, 2.5, 6.0),
        ("Ti I", 0.08, 1.3, 0.7, 0.0, 3.0), ("Ti II", 0.03, 1.6, 0.6, 0.5, 3.2),
        ("Cr I", 0.06, 2.8, 1.0, 0.9, 4.5), ("Cr II", 0.01, 4.0, 0.3, 3.5, 4.8),
        ("Ni I", 0.06, 3.5, 0.8, 1.6, 5.5), ("Ca I", 0.03, 2.7, 0.6, 1.9, 4.6),
        ("Mn I", 0.03, 3.5, 1.0, 2.0, 5.5), ("V I", 0.04, 1.3, 0.6, 0.0, 3.0),
        ("Co I", 0.03, 2.5, 0.9, 0.4, 4.5), ("Si I", 0.03, 5.6, 0.4, 4.9, 6.3),
        ("Mg I", 0.015, 5.2, 0.7, 4.3, 6.7), ("Sc II", 0.015, 1.0, 0.5, 0.3, 2.0),
        ("Y II", 0.005, 1.2, 0.5, 0.0, 2.0), ("Na I", 0.005, 3.2, 0.5, 2.1, 4.3),
        ("Al I", 0.005, 3.6, 0.4, 3.1, 4.3), ("C I", 0.01, 8.0, 0.5, 7.4, 8.8))),
    (15050.0, 17050.0, 1000, 0.0, (0.0, 2.1), 0.3, (
        ("Fe I", 0.55, 5.4, 0.6, 3.6, 6.7), ("Si I", 0.10, 6.0, 0.4, 5.0, 7.1),
        ("Mg I", 0.05, 6.2, 0.4, 5.4, 7.0), ("Ni I", 0.08, 5.6, 0.4, 4.0, 6.3),
        ("Ti I", 0.05, 2.0, 0.3, 1.4, 3.0), ("Ca I", 0.03, 4.6, 0.3, 4.0, 5.4),
        ("Cr I", 0.03, 4.2, 0.5, 3.0, 5.0), ("Mn I", 0.02, 5.0, 0.3, 4.4, 5.5),
        ("Co I", 0.02, 3.5, 0.6, 2.5, 5.0), ("V I", 0.02, 2.2, 0.4, 1.3, 3.0),
        ("C I", 0.03, 9.3, 0.4, 8.6, 10.0), ("Al I", 0.01, 4.5, 0.3, 4.0, 5.0),
        ("Na I", 0.01, 4.0, 0.3, 3.5, 4.5), ("K I", 0.005, 3.0, 0.3, 2.6, 3.5),
        ("S I", 0.01, 8.1, 0.3, 7.8, 8.9))),
)

# Molecular bands: (molecule, head wavelength in air A, +1 degraded to the red / -1 to the violet, extent in A,
# number of lines, lower vibrational energy eV, rotational constant B eV, solar width of the band's strongest
# line in mA).  Heads of CO (second overtone, 3-0 ... 9-6), CN violet, CH G band, MgH A-X and TiO.
MOLECULAR_BANDS = (
    ("CO", 15577.7, 1, 150.0, 55, 0.000, 2.38e-4, 25.0), ("CO", 15775.7, 1, 150.0, 55, 0.266, 2.38e-4, 22.0),
    ("CO", 15977.6, 1, 150.0, 55, 0.529, 2.38e-4, 19.0), ("CO", 16184.5, 1, 150.0, 55, 0.789, 2.38e-4, 16.0),
    ("CO", 16392.5, 1, 150.0, 55, 1.046, 2.38e-4, 13.0), ("CO", 16605.5, 1, 150.0, 55, 1.300, 2.38e-4, 10.0),
    ("CO", 16831.4, 1, 150.0, 55, 1.550, 2.38e-4, 8.0),
    ("CN", 3883.4, -1, 60.0, 45, 0.000, 2.34e-4, 150.0), ("CN", 3871.4, -1, 40.0, 30, 0.255, 2.34e-4, 90.0),
    ("CN", 4216.0, -1, 60.0, 40, 0.255, 2.34e-4, 60.0), ("CN", 4197.2, -1, 40.0, 25, 0.505, 2.34e-4, 35.0),
    ("CH", 4323.0, -1, 50.0, 70, 0.000, 1.76e-3, 110.0),
    ("MgH", 5211.0, -1, 120.0, 60, 0.000, 7.2e-4, 12.0),
    ("TiO", 4954.6, 1, 80.0, 30, 0.000, 6.6e-5, 0.06), ("TiO", 5166.7, 1, 80.0, 30, 0.125, 6.6e-5, 0.05),
    ("TiO", 5447.9, 1, 80.0, 30, 0.000, 6.6e-5, 0.05), ("TiO", 5847.0, 1, 80.0, 30, 0.125, 6.6e-5, 0.04),
    ("TiO", 6158.6, 1, 80.0, 30, 0.000, 6.6e-5, 0.05), ("TiO", 7053.9, 1, 100.0, 40, 0.000, 6.6e-5, 0.10),
    ("TiO", 7589.3, 1, 100.0, 40, 0.125, 6.6e-5, 0.06), ("TiO", 8432.5, 1, 100.0, 40, 0.000, 6.6e-5, 0.05),
    ("TiO", 8859.6, 1, 100.0, 40, 0.125, 6.6e-5, 0.04),
)

# Scattered molecular lines: (molecule, first, last wavelength A, number, excitation range eV, log10 range of
# the solar width in mA): OH (second overtone) and CN (red system) fill the H band as in APOGEE spectra.
MOLECULAR_FORESTS = (
    ("OH", 15050.0, 17050.0, 250, (0.2, 1.6), (0.4, 1.6)),
    ("CN", 15050.0, 17050.0, 400, (0.3, 2.0), (-0.1, 1.0)),
)

LOG_GAMMA_STARK_SUN = 10.2
"""log10 Stark damping (s^-1) of H alpha in the Sun (sets its equivalent width, 4.1 A).  Other lines scale
with n_upper^2 - n_lower^2 (linear Stark effect) times :data:`HYDROGEN_SERIES`' factor, and all with the
electron pressure, which the H- continuum shares: the wing strength tau0 * a of the damping-dominated Balmer
lines is nearly gravity-blind, as observed, while the less saturated Brackett lines keep some gravity
sensitivity."""
HYDROGEN_SERIES = {2: (1.0, MAX_CENTRAL_DEPTH, 1.8), 4: (0.05, 0.4, 4.4)}
"""Lower level n: (Stark scale, deepest line centre, Boltzmann slope in eV).  Hydrogen lines keep the solar
value of their Boltzmann factor (lower levels at 10.2 eV, Balmer, and 12.75 eV, Brackett) but change with
temperature as a level at the slope's energy would: their wings form deep in the atmosphere, much hotter than
T_line, and a model without depth dependence would otherwise make H alpha grow a thousandfold from 4000 to
7000 K instead of the observed few-fold (about 1, 4 and 8 A at 4000, 5800 and 7000 K in dwarfs, which 1.8 eV
reproduces).  Brackett lines are broad and shallow in FGK stars, a few per cent deep in the Sun, tens of per
cent in F stars and nearly gone in K stars; their values give Br 11 (16807 A) about 0.5 A in the Sun and 1.3 A
at 7000 K."""
CONTINUUM_SHAPE = ((3500.0, -0.05), (4500.0, -0.07), (5500.0, -0.04), (6700.0, 0.0), (8500.0, 0.04),
                   (10000.0, 0.0), (12000.0, -0.12), (15000.0, -0.33), (16400.0, -0.40), (17500.0, -0.37))
"""log10 of the continuous opacity (H- bound-free plus free-free) relative to 6700 A, roughly: it peaks near
8500 A and has its minimum at the 1.64 micron H- threshold, so H-band lines are stronger for their gf."""
TAIL_FLOOR = 1e-5
"""Survey mode: depth below which the far Lorentz wings of lines beyond a segment's margin are neglected."""
WING_CUTOFF_KMS = 0.1 * SPEED_OF_LIGHT_KMS
"""Survey mode: Lorentz wings end smoothly 10 % of the wavelength from their line (a real line's far wing falls
faster than a Lorentzian); this also keeps a pixel's flux independent of how far the grid extends."""
SEGMENT_MARGINS = 2.83
"""Survey-mode pixel segments span this many margins (sqrt(8) minimises the cost of the Fourier boxes)."""
SOFT_FLOOR_START, SOFT_FLOOR_FLUX = 0.2, 0.02
"""Survey mode: below flux 0.2 blended depths saturate smoothly towards 0.02 instead of clipping at 0."""
SURVEY_CHUNK_STARS = 512
"""Survey mode: stars whose line parameters are computed together (bounds the (stars, lines) arrays)."""
SURVEY_VSINI_ALLOWANCE, SURVEY_SHIFT_ALLOWANCE = 40.0, 10.0
"""km/s: survey mode sizes its Fourier boxes for at least these vsini and |radial velocity|, so that which lines
a box holds, and hence a star's spectrum, does not depend on the other stars synthesized with it."""
TERM_BUCKET = 6
"""Survey mode: lines whose Chebyshev series need term counts in the same bucket of this size share a basis."""
BROAD_LINE_MARGIN = 0.05
"""Survey mode: lines with Lorentz half widths above this fraction of the margin (Balmer lines, Ca II H and K,
Na D in cool dwarfs), or whose wings 3 margins away exceed :data:`TAIL_FLOOR`, are added in closed form rather
than in the periodic Fourier box, whose images of their far wings would otherwise fold back onto the pixels."""
ROTATION_KERNEL_VARIANCE = ((1.0 - LIMB_DARKENING) / 4.0 + 2.0 * LIMB_DARKENING / 15.0) / (1.0 - LIMB_DARKENING / 3.0)
"""Variance of Gray's rotation kernel in units of vsini^2 (0.225 for epsilon = 0.6): the Gaussian stand-in for
rotation in the closed-form line profiles."""


def air_wavelength(vacuum):
    """Air wavelengths (A) of vacuum wavelengths ``vacuum`` (A), Morton (2000) / Ciddor dispersion of air."""
    vacuum = np.asarray(vacuum, dtype=np.float64)
    s2 = (1e4 / vacuum) ** 2
    return vacuum / (1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2))


def _hydrogen_lines():
    """Balmer (n=2 -> 3..22) and Brackett (n=4 -> 10..26) lines: (air A, 'H I', chi eV, log gf, Stark factor,
    deepest centre, Boltzmann slope eV), the Stark factor being n_u^2 - n_l^2 times the series' scale in
    :data:`HYDROGEN_SERIES`.

    Wavelengths from the Rydberg formula, oscillator strengths from Kramers' formula times 0.86 (the Gaunt
    factor that matches H epsilon), except H alpha ... H epsilon, which take their exact values.
    """
    rydberg = 109677.583  # cm^-1, hydrogen
    exact_balmer = {3: 0.6407, 4: 0.1193, 5: 0.04467, 6: 0.02209, 7: 0.01270}
    rows = []
    for lower, uppers in ((2, range(3, 23)), (4, range(10, 27))):
        for upper in uppers:
            term = 1.0 / lower ** 2 - 1.0 / upper ** 2
            wavelength = float(air_wavelength(1e8 / (rydberg * term)))
            kramers = 32.0 / (3.0 ** 1.5 * math.pi) / (lower ** 5 * upper ** 3) / term ** 3
            f_value = exact_balmer.get(upper, 0.86 * kramers) if lower == 2 else 0.86 * kramers
            chi = 13.598 * (1.0 - 1.0 / lower ** 2)
            stark_scale, max_depth, slope = HYDROGEN_SERIES[lower]
            rows.append((wavelength, "H I", chi, math.log10(2 * lower ** 2 * f_value),
                         stark_scale * (upper ** 2 - lower ** 2), max_depth, slope))
    return rows


def _truncated_normal(rng, mean, sd, low, high, size):
    values = rng.normal(mean, sd, size)
    bad = (values < low) | (values > high)
    while bad.any():
        values[bad] = rng.normal(mean, sd, int(bad.sum()))
        bad = (values < low) | (values > high)
    return values


def _power_law_log(rng, log_low, log_high, slope, size):
    """log10 W drawn with dN/dlog W ~ W**-slope between 10**log_low and 10**log_high."""
    u = rng.uniform(0.0, 1.0, size)
    a, b = 10.0 ** (-slope * log_low), 10.0 ** (-slope * log_high)
    return -np.log10(a + u * (b - a)) / slope


def _survey_rows():
    """All survey lines before calibration: list of (wavelength, species, chi, log gf or None, target mA or
    None, band id or -1, Stark factor, deepest line centre, Boltzmann slope eV).  Deterministic (seed
    :data:`SURVEY_LINE_SEED`)."""
    rng = np.random.default_rng(SURVEY_LINE_SEED)
    rows = [(w, s, chi, gf, None, -1, 0.0, MAX_CENTRAL_DEPTH, chi) for w, s, chi, gf in LINE_LIST]
    rows += [(w, s, chi, gf, None, -1, 0.0, MAX_CENTRAL_DEPTH, chi) for w, s, chi, gf in STRONG_LINES]
    rows += [(w, s, chi, gf, None, -1, float(stark), depth, slope)
             for w, s, chi, gf, stark, depth, slope in _hydrogen_lines()]
    tutorial_low, tutorial_high = 6590.0, 6860.0
    for low, high, count, exponent, log_range, slope, mix in PSEUDO_REGIONS:
        # wavelengths with density ~ lambda**-exponent (inverse CDF), none inside the tutorial window
        u = rng.uniform(0.0, 1.0, count)
        if exponent == 1.0:
            wave = low * (high / low) ** u
        else:
            power = 1.0 - exponent
            wave = (low ** power + u * (high ** power - low ** power)) ** (1.0 / power)
        wave = wave[(wave < tutorial_low) | (wave > tutorial_high)]
        weights = np.array([entry[1] for entry in mix])
        choice = rng.choice(len(mix), size=wave.size, p=weights / weights.sum())
        targets = _power_law_log(rng, log_range[0], log_range[1], slope, wave.size)
        chis = np.empty(wave.size)
        for number, (_, _, mean, sd, chi_low, chi_high) in enumerate(mix):
            picked = choice == number
            chis[picked] = _truncated_normal(rng, mean, sd, chi_low, chi_high, int(picked.sum()))
        rows += [(float(w), mix[k][0], float(chi), None, float(10.0 ** t), -1, 0.0, MAX_CENTRAL_DEPTH, float(chi))
                 for w, k, chi, t in zip(wave, choice, chis, targets)]
    for band, (molecule, head, direction, extent, count, chi_vib, rotation, target) in enumerate(MOLECULAR_BANDS):
        # A folded Fortrat parabola: lines pile up at the head (J near J_head) and spread away from it.
        j = np.arange(count, dtype=np.float64) * (100.0 / count)
        j_head = 50.0
        offset = extent * ((j - j_head) / j_head) ** 2 * np.where(j < j_head, 1.0, 0.6) \
            + rng.uniform(0.0, 0.15, count)
        wave = head + direction * offset
        chi = chi_vib + rotation * j * (j + 1.0)
        log_gf = np.log10(2.0 * j + 1.0)
        rows += [(float(w), molecule, float(x), float(g), target, band, 0.0, MAX_CENTRAL_DEPTH, float(x))
                 for w, x, g in zip(wave, chi, log_gf)]
    for molecule, low, high, count, chi_range, log_range in MOLECULAR_FORESTS:
        wave = rng.uniform(low, high, count)
        chi = rng.uniform(chi_range[0], chi_range[1], count)
        targets = rng.uniform(log_range[0], log_range[1], count)
        rows += [(float(w), molecule, float(x), None, float(10.0 ** t), -1, 0.0, MAX_CENTRAL_DEPTH, float(x))
                 for w, x, t in zip(wave, chi, targets)]
    return rows


def _species_arrays(species):
    """Per-line properties of ``species`` names ('Fe I', 'Ca II', 'H I', 'CO', ...) for the survey model: for a
    molecule, its mass and dissociation data, the minority element's properties in the atomic fields and the
    partner element's in the ``partner_*`` fields."""
    n = len(species)
    out = {key: np.zeros(n) for key in ("mass", "abundance", "chi_ion", "u_neutral", "u_ion", "partner_abundance",
                                        "partner_chi_ion", "partner_u_neutral", "partner_u_ion", "dissociation",
                                        "log_x_sun")}
    out["partner_u_neutral"][:] = out["partner_u_ion"][:] = 1.0  # atoms have no partner: harmless values
    for key in ("ionised", "alpha", "partner_alpha", "molecule", "hydrogen", "scaled", "partner_scaled"):
        out[key] = np.zeros(n, dtype=bool)
    for i, name in enumerate(species):
        if name in MOLECULES:
            mass, dissociation, minority, partner, log_x_sun = MOLECULES[name]
            out["molecule"][i] = True
            out["mass"][i], out["dissociation"][i], out["log_x_sun"][i] = mass, dissociation, log_x_sun
            element = minority
            _, p_abundance, p_chi, p_u1, p_u2, p_alpha = SURVEY_ELEMENTS[partner]
            out["partner_abundance"][i], out["partner_chi_ion"][i] = p_abundance, p_chi
            out["partner_u_neutral"][i], out["partner_u_ion"][i] = p_u1, p_u2
            out["partner_alpha"][i], out["partner_scaled"][i] = p_alpha, partner != "H"
        else:
            element, stage = name.split()
            out["ionised"][i] = stage == "II"
            out["hydrogen"][i] = element == "H"
        e_mass, e_abundance, e_chi, e_u1, e_u2, e_alpha = SURVEY_ELEMENTS[element]
        if not out["molecule"][i]:
            out["mass"][i] = e_mass
        out["abundance"][i], out["chi_ion"][i], out["u_neutral"][i], out["u_ion"][i] = e_abundance, e_chi, e_u1, e_u2
        out["alpha"][i], out["scaled"][i] = e_alpha, element != "H"
    return out


def _atmosphere(labels):
    """Per-star quantities of the teaching model, each (n, 1): T_line, theta_line, theta_eff, log P_e, [Fe/H],
    [alpha/Fe] (the same formulas as :func:`_line_parameters`)."""
    teff, logg, feh = labels[:, 0:1], labels[:, 1:2], labels[:, 2:3]
    t_line = LINE_TEMPERATURE_FRACTION * teff
    theta_eff = 5040.0 / teff
    log_pe = LOG_PE_SUN + (logg - 4.44) / 3.0 - PE_THETA_SLOPE * (theta_eff - THETA_SUN)
    return t_line, 5040.0 / t_line, theta_eff, log_pe, feh, np.clip(-0.4 * feh, 0.0, 0.4)


def _log_stage_fractions(atmosphere, chi_ion, u_neutral, u_ion):
    """Saha: log10 of the neutral and of the once-ionised fraction of an element, each (n, m)."""
    t_line, theta_line, _, log_pe, _, _ = atmosphere
    ln10 = math.log(10.0)
    log_ratio = np.log10(u_ion / u_neutral) + 2.5 * np.log10(t_line) - theta_line * chi_ion - 0.1762 - log_pe
    return -np.logaddexp(0.0, log_ratio * ln10) / ln10, -np.logaddexp(0.0, -log_ratio * ln10) / ln10


def _log_abundance(atmosphere, abundance, scaled, alpha):
    """log10 atoms per H atom: A(X) - 12, plus [Fe/H] where ``scaled``, plus [alpha/Fe] where ``alpha``."""
    _, _, _, _, feh, enhancement = atmosphere
    return abundance - 12.0 + np.where(scaled, feh, 0.0) + np.where(alpha, enhancement, 0.0)


def _log_free_partner(atmosphere, lines):
    """log10 free neutral atoms per H atom of each molecule's partner element."""
    neutral, _ = _log_stage_fractions(atmosphere, lines["partner_chi_ion"], lines["partner_u_neutral"],
                                      lines["partner_u_ion"])
    return _log_abundance(atmosphere, lines["partner_abundance"], lines["partner_scaled"],
                          lines["partner_alpha"]) + neutral


def _survey_strengths(labels, lines):
    """log10 weak-line width (A), Doppler parameter b (km/s) and Lorentz half width (km/s), each (n, m), of the
    survey lines ``lines`` for ``labels`` (n, 5): the tutorial recipe plus molecules, hydrogen and the
    continuum's wavelength dependence (see :func:`survey_line_table`)."""
    atmosphere = _atmosphere(labels)
    t_line, theta_line, theta_eff, log_pe, feh, _ = atmosphere
    logg, vmic = labels[:, 1:2], labels[:, 3:4]
    ln10 = math.log(10.0)
    log_pg_shift = 0.6 * (logg - 4.44) + 2.5 * (theta_eff - THETA_SUN) - 0.3 * feh

    neutral, ion = _log_stage_fractions(atmosphere, lines["chi_ion"], lines["u_neutral"], lines["u_ion"])
    log_abundance = _log_abundance(atmosphere, lines["abundance"], lines["scaled"], lines["alpha"])
    log_population = log_abundance + np.where(lines["ionised"], ion, neutral) \
        - np.log10(np.where(lines["ionised"], lines["u_ion"], lines["u_neutral"]))
    if lines["molecule"].any():
        # Dissociation equilibrium: molecules per free minority atom, x ~ (free partner atoms) P_gas
        # 10**(theta D) T**-1.5, scaled to x_sun in the Sun.  The minority element is shared between atoms and
        # molecules, so the molecular fraction x / (1 + x) saturates at 1 (all carbon in CO, say); molecular
        # partition functions are constants absorbed into the calibrated gf.
        sun = _atmosphere(np.asarray([SOLAR_LABELS], dtype=np.float64))
        log_x = (lines["log_x_sun"] + _log_free_partner(atmosphere, lines) - _log_free_partner(sun, lines)
                 + log_pg_shift + lines["dissociation"] * (theta_line - sun[1])
                 - 1.5 * np.log10(t_line / sun[0]))
        log_molecular = log_abundance + neutral - np.logaddexp(0.0, -log_x * ln10) / ln10
        log_population = np.where(lines["molecule"], log_molecular, log_population)
    # Boltzmann factor: solar value at chi_exc, temperature slope of chi_slope (= chi_exc except hydrogen,
    # see HYDROGEN_SERIES).
    theta_line_sun = 5040.0 / (LINE_TEMPERATURE_FRACTION * SOLAR_LABELS[0])
    boltzmann = theta_line * lines["chi_slope"] + theta_line_sun * (lines["chi_exc"] - lines["chi_slope"])
    wavelength = lines["wavelength"]
    shape = np.interp(np.log(wavelength), np.log([row[0] for row in CONTINUUM_SHAPE]),
                      [row[1] for row in CONTINUUM_SHAPE])
    log_kappa = log_pe + 2.5 * np.log10(theta_line) + 0.754 * theta_line + shape
    log_w0_angstrom = (LOG_STRENGTH_SCALE + lines["log_gf"] + log_population - boltzmann - log_kappa
                       + 2.0 * np.log10(wavelength / 6700.0))

    thermal = 2.0 * BOLTZMANN_J_PER_K * t_line / (lines["mass"] * ATOMIC_MASS_UNIT_KG) / 1e6
    b = np.sqrt(thermal + vmic ** 2)
    van_der_waals = 10.0 ** (LOG_GAMMA_VDW_SUN + GAMMA_VDW_CHI_SLOPE * lines["chi_exc"] + log_pg_shift)
    stark = 10.0 ** (LOG_GAMMA_STARK_SUN + log_pe - LOG_PE_SUN) * (lines["stark"] / 5.0)  # H alpha: 5
    gamma_total = 10.0 ** LOG_GAMMA_RAD + np.where(lines["hydrogen"], stark, van_der_waals)
    gamma_kms = gamma_total * wavelength * 1e-13 / (4.0 * math.pi)
    return log_w0_angstrom, b, gamma_kms


def _survey_line_parameters(labels, lines):
    """(W, b_profile, gamma_profile), each (n, m) km/s, of survey lines: :func:`_survey_strengths` then the
    tutorial model's curve of growth and profile."""
    log_w0_angstrom, b, gamma_kms = _survey_strengths(labels, lines)
    w0 = SPEED_OF_LIGHT_KMS * 10.0 ** log_w0_angstrom / lines["wavelength"]
    return _curve_of_growth(w0, b, gamma_kms, lines["max_depth"])


@functools.lru_cache(maxsize=1)
def _survey_table_cached():
    rows = sorted(_survey_rows(), key=lambda row: row[0])
    species = [row[1] for row in rows]
    table = _species_arrays(species)
    table["wavelength"] = np.array([row[0] for row in rows])
    table["chi_exc"] = np.array([row[2] for row in rows])
    table["log_gf"] = np.array([0.0 if row[3] is None else row[3] for row in rows])
    table["stark"] = np.array([row[6] for row in rows])
    table["max_depth"] = np.array([row[7] for row in rows])
    table["chi_slope"] = np.array([row[8] for row in rows])
    # Calibration: a pseudo line's log gf is whatever gives its drawn width to the Sun; a band keeps the
    # relative gf of its lines and is scaled so that its strongest line has the band's solar width.
    log_w0_sun, _, _ = _survey_strengths(np.asarray([SOLAR_LABELS], dtype=np.float64), table)
    log_w0_sun = log_w0_sun[0]
    target = np.array([np.nan if row[4] is None else math.log10(row[4] * 1e-3) for row in rows])
    band = np.array([row[5] for row in rows])
    single = np.isfinite(target) & (band < 0)
    table["log_gf"][single] = target[single] - log_w0_sun[single]
    for number in np.unique(band[band >= 0]):
        members = band == number
        table["log_gf"][members] += target[members][0] - log_w0_sun[members].max()
    table["species"] = np.array(species)
    for value in table.values():
        value.setflags(write=False)
    return table


def survey_line_table(wave_min=-np.inf, wave_max=np.inf):
    """The survey line list between ``wave_min`` and ``wave_max`` (air A) as a dict of arrays (one per line).

    Keys: ``wavelength``, ``species`` ('Fe I', 'CO', ...), ``chi_exc`` (eV), ``log_gf`` and the per-species
    properties the model needs.  7298 lines (about 1960 in the APOGEE range, 5000 in LAMOST's): the 58 real
    lines of :data:`LINE_LIST` (6590-6860 A), 187 :data:`STRONG_LINES` (real strong optical and H-band
    lines), 37 Balmer and Brackett lines (:func:`_hydrogen_lines`), 1615 lines of molecular bands and forests
    (:data:`MOLECULAR_BANDS`, :data:`MOLECULAR_FORESTS`) and 5401 pseudo atomic lines (:data:`PSEUDO_REGIONS`;
    none in 6590-6860 A) whose log gf are calibrated on the Sun (see the module docstring).  Built once per
    process, deterministic.
    """
    table = _survey_table_cached()
    low = np.searchsorted(table["wavelength"], wave_min, side="left")
    high = np.searchsorted(table["wavelength"], wave_max, side="right")
    return {key: value[low:high] for key, value in table.items()}


def _voigt(offset, sigma, gamma):
    """Voigt profile (unit area) at ``offset`` from the centre, Gaussian ``sigma``, Lorentz half width ``gamma``
    (km/s, broadcast together): exact within 6 sigma of the centre, beyond it the Lorentzian with its
    second-order Gaussian correction ``L + sigma^2 L'' / 2`` (relative error below 1e-3), tapered by
    ``(1 - (offset / WING_CUTOFF_KMS)^2)^2`` to zero at :data:`WING_CUTOFF_KMS`."""
    offset, sigma, gamma = np.broadcast_arrays(offset, sigma, gamma)
    square = offset * offset
    gamma_square = gamma * gamma
    denominator = square + gamma_square
    profile = 3.0 * square
    profile -= gamma_square
    profile *= sigma * sigma
    profile /= denominator * denominator
    profile += 1.0
    profile *= gamma
    profile /= denominator
    taper = np.maximum(1.0 - square * (1.0 / WING_CUTOFF_KMS ** 2), 0.0)
    profile *= taper * taper * (1.0 / math.pi)
    core = square < 36.0 * sigma * sigma
    if core.any():
        profile[core] = special.voigt_profile(offset[core], sigma[core], gamma[core])
    return profile


def _soft_floor(depth):
    """Flux 1 - depth, saturating smoothly (C1) below :data:`SOFT_FLOOR_START` towards :data:`SOFT_FLOOR_FLUX`."""
    flux = 1.0 - depth
    low = flux < SOFT_FLOOR_START
    scale = SOFT_FLOOR_START - SOFT_FLOOR_FLUX
    flux[low] = SOFT_FLOOR_FLUX + scale * np.exp((flux[low] - SOFT_FLOOR_START) / scale)
    return flux


def _survey_segments(low_wave, high_wave, margin):
    """Split the pixels into contiguous (start, stop) runs spanning at most SEGMENT_MARGINS x ``margin`` km/s,
    cutting at every gap wider than ``margin`` (chip gaps).  ``low_wave``/``high_wave``: per pixel (column)
    smallest and largest wavelength over the spectra."""
    c = SPEED_OF_LIGHT_KMS
    v_low = c * np.log(low_wave / low_wave[0])
    v_high = c * np.log(high_wave / low_wave[0])
    length = SEGMENT_MARGINS * margin
    segments, start = [], 0
    for pixel in range(1, low_wave.size):
        if v_high[pixel] - v_low[start] > length or v_low[pixel] - v_high[pixel - 1] > margin:
            segments.append((start, pixel))
            start = pixel
    segments.append((start, low_wave.size))
    return segments


def _synthesize_survey(wave, labels, velocity_shift, sigma_instrument, margin):
    """Survey-mode spectra (n, npix): :func:`survey_line_table` lines, segmented Fourier boxes, far wings.

    Wide grids (the H band, 3700-9100 A) are cut into segments of about 2.8 margins (:func:`_survey_segments`);
    each is one :func:`_box_depth` box holding the lines within ``margin`` of its pixels, so the cost grows
    with the number of pixels rather than with pixels x lines.  Lines farther away still reach the segment
    through their Lorentz wings: those are added in closed form (:func:`_voigt` with the instrument and
    rotation as one Gaussian) wherever they exceed :data:`TAIL_FLOOR`, and so are the lines whose wings are
    too broad for a periodic box (Balmer lines, Ca II H and K, Na D in cool dwarfs; see
    :data:`BROAD_LINE_MARGIN`).  These choices are made per star, so a star's spectrum does not depend on the
    others synthesized with it (to ~1e-6); segment boundaries are invisible to ~2e-4 in the most line-blanketed
    spectra (cool dwarfs in the blue), to ~1e-5 in most.  Blends deeper than 0.8 saturate smoothly
    (:func:`_soft_floor`) instead of clipping at zero flux.  Cost on one core: about 100 APOGEE-grid or 120
    LAMOST-grid spectra a second.
    """
    c = SPEED_OF_LIGHT_KMS
    n_stars = labels.shape[0]
    low_wave = wave.min(axis=0) if wave.ndim == 2 else wave
    high_wave = wave.max(axis=0) if wave.ndim == 2 else wave
    table = survey_line_table(float(low_wave[0]) * math.exp(-WING_CUTOFF_KMS / c),
                              float(high_wave[-1]) * math.exp(WING_CUTOFF_KMS / c))
    table_wave = table["wavelength"]
    segments = _survey_segments(low_wave, high_wave, margin)
    flux = np.empty((n_stars, wave.shape[-1]), dtype=np.float64)
    for first in range(0, n_stars, SURVEY_CHUNK_STARS):
        last = min(first + SURVEY_CHUNK_STARS, n_stars)
        part = labels[first:last]
        if table_wave.size:
            width, b_profile, gamma_profile = _survey_line_parameters(part, table)
            wing = width * gamma_profile / math.pi  # depth x dv^2 far from the line
            # Per star and line, so that a star's spectrum does not depend on the others in the call: lines
            # whose images in the periodic box (3 margins or more from the pixels) would matter go in closed
            # form, and lines beyond the box's window only while their wing exceeds TAIL_FLOOR.
            broad = (gamma_profile > BROAD_LINE_MARGIN * margin) | (wing > TAIL_FLOOR * (3.0 * margin) ** 2)
            reach = np.minimum(np.sqrt(wing / TAIL_FLOOR), WING_CUTOFF_KMS)
            boxed_width = np.where(broad, 0.0, width)
            boxable = ~broad.all(axis=0)
            sigma_core = np.sqrt(sigma_instrument ** 2 + 0.5 * b_profile ** 2
                                 + ROTATION_KERNEL_VARIANCE * part[:, 4:5] ** 2)
        for start, stop in segments:
            sub = wave[first:last, start:stop] if wave.ndim == 2 else wave[start:stop]
            chosen = []

            def select(wave_min, wave_max):
                low = int(np.searchsorted(table_wave, wave_min, side="left"))
                high = int(np.searchsorted(table_wave, wave_max, side="right"))
                inside = np.zeros(table_wave.size, dtype=bool)
                inside[low:high] = True
                chosen.append(inside)
                boxed = np.flatnonzero(inside & boxable) if table_wave.size else np.arange(0)
                if not boxed.size:
                    return table_wave[boxed], None, None, None
                return table_wave[boxed], boxed_width[:, boxed], b_profile[:, boxed], gamma_profile[:, boxed]

            depth = _box_depth(sub, part, velocity_shift[first:last], sigma_instrument, margin, select,
                               split_terms=True)
            if table_wave.size:
                inside = chosen[0]
                near, far = float(low_wave[start]), float(high_wave[stop - 1])
                distance = c * np.maximum(np.log(near / table_wave), np.log(table_wave / far))
                closed_form = np.where(inside, broad, distance < reach)  # (stars, lines)
                analytic = np.flatnonzero(closed_form.any(axis=0))
                if analytic.size:
                    weight = np.where(closed_form[:, analytic], width[:, analytic], 0.0)
                    rest = c * np.log(sub[..., None, :] / table_wave[analytic, None])  # (.., m, p)
                    # small blocks of stars keep the (stars, lines, pixels) temporaries in cache
                    block = max(1, 250_000 // (analytic.size * (stop - start)))
                    for low in range(0, last - first, block):
                        high = min(low + block, last - first)
                        offset = (rest[low:high] if wave.ndim == 2 else rest) \
                            - velocity_shift[first + low:first + high, None, None]
                        depth[low:high] += np.einsum(
                            "sm,smp->sp", weight[low:high],
                            _voigt(offset, sigma_core[low:high, analytic, None],
                                   gamma_profile[low:high, analytic, None]))
            flux[first:last, start:stop] = _soft_floor(depth)
    return flux


# ---------------------------------------------------------------------------------------------------------
# Survey-like grids and their S/N profiles

APOGEE_LOG_START, APOGEE_LOG_STEP = 4.179, 6e-6
APOGEE_CHIP_PIXELS = ((322, 3242), (3648, 6048), (6412, 8306))
"""Pixels of the 8575-pixel apStar grid that the three detectors fill (ASPCAP's 7214-pixel selection)."""
APOGEE_RESOLUTION = 22500.0
APOGEE_CHIP_GAINS = (0.7, 1.0, 0.85)
"""Relative throughput of the blue, green and red detectors of the APOGEE-like S/N model."""
LAMOST_LOG_START, LAMOST_LOG_STEP, LAMOST_PIXELS = 3.5682, 1e-4, 3909
LAMOST_RESOLUTION = 1800.0
TUTORIAL_RESOLUTION = 11000.0
GRIDS = ("tutorial", "apogee", "lamost")
SURVEY_SN_STEPS = {"apogee": 1.0, "lamost": 2.0}
"""Wavelength steps (A) of the survey S/N templates."""


def apogee_grid():
    """APOGEE-like grid: 7214 pixels, log-linear (log10 step 6e-6, 4.1 km/s) on three chips, 15168-16937 A.

    The apStar layout (log10 lambda = 4.179 + 6e-6 i, i = 0..8574) keeping only the pixels the three detectors
    fill (:data:`APOGEE_CHIP_PIXELS`: 2920 + 2400 + 1894) and concatenating them, as APOGEE networks
    (astroNN, StarNet) feed them: two chip gaps of about 60 A remain in the wavelengths, none in the pixels.
    Read as air wavelengths, like the whole teaching model; real APOGEE pixels are vacuum wavelengths (the same
    numbers lie 4.5 A, 82 km/s, bluewards in air), which matters only when comparing with real spectra.
    """
    index = np.concatenate([np.arange(start, stop) for start, stop in APOGEE_CHIP_PIXELS])
    return 10.0 ** (APOGEE_LOG_START + APOGEE_LOG_STEP * index)


def lamost_grid():
    """LAMOST-LRS-like grid: 3909 pixels, log-linear (log10 step 1e-4, 69 km/s), 3700.0-9099.6 A.

    LAMOST's low-resolution layout (log10 lambda = 3.5682 + 1e-4 i), read as air wavelengths like the rest of
    the teaching model (LAMOST's own pixels are vacuum wavelengths).
    """
    return 10.0 ** (LAMOST_LOG_START + LAMOST_LOG_STEP * np.arange(LAMOST_PIXELS))


def survey_grid(name):
    """``(wavelengths, resolution)`` of a named grid: 'tutorial' (:func:`default_grid`, R = 11000), 'apogee'
    (:func:`apogee_grid`, R = 22500) or 'lamost' (:func:`lamost_grid`, R = 1800)."""
    if name == "tutorial":
        return default_grid(), TUTORIAL_RESOLUTION
    if name == "apogee":
        return apogee_grid(), APOGEE_RESOLUTION
    if name == "lamost":
        return lamost_grid(), LAMOST_RESOLUTION
    raise AnnaInputError(f"unknown grid; choose one of {', '.join(GRIDS)}", key="grid", value=name)


def _window(wave, low, high, edge):
    """Smooth top hat: ~1 between ``low`` and ``high``, falling over ``edge`` A at both ends."""
    return 0.25 * (1.0 + np.tanh((wave - low) / edge)) * (1.0 + np.tanh((high - wave) / edge))


def _apogee_throughput(wave):
    edges = 10.0 ** (APOGEE_LOG_START + APOGEE_LOG_STEP * (np.asarray(APOGEE_CHIP_PIXELS) - 0.5))
    throughput = np.zeros_like(wave)
    for (low, high), gain in zip(edges, APOGEE_CHIP_GAINS):
        throughput = throughput + gain * _window(wave, low, high, 4.0)
    return throughput * np.exp(-0.5 * ((wave - 16200.0) / 1000.0) ** 2)


def apogee_relative_sn(wavelengths):
    """Relative S/N of the APOGEE-like spectrograph at ``wavelengths`` (A), peak 1.0.

    An instrument model, not a measurement: the H-band response (a broad bump peaking at 16200 A, 0.6 of its
    peak at the band edges) times the three detector windows (:data:`APOGEE_CHIP_PIXELS`, edges falling over
    about 4 A) with relative gains :data:`APOGEE_CHIP_GAINS`.  Photon-limited S/N goes as the square root of the
    throughput.  In the chip gaps the profile rests on a floor of 0.02, since the template format needs a
    positive S/N everywhere (no pixel of the grid lies there).
    """
    wave = np.asarray(wavelengths, dtype=np.float64)
    reference = np.linspace(15000.0, 17100.0, 21001)
    peak = float(np.sqrt(_apogee_throughput(reference)).max())
    return np.maximum(np.sqrt(_apogee_throughput(wave)) / peak, 0.02)


def _lamost_throughput(wave):
    blue = 0.4 * np.exp(-0.5 * ((wave - 5000.0) / 900.0) ** 2) * 0.5 * (1.0 + np.tanh((5750.0 - wave) / 60.0))
    red = np.exp(-0.5 * ((wave - 7300.0) / 1500.0) ** 2) * 0.5 * (1.0 + np.tanh((wave - 5850.0) / 60.0))
    return blue + red


def lamost_relative_sn(wavelengths):
    """Relative S/N of the LAMOST-like spectrograph at ``wavelengths`` (A), peak 1.0.

    An instrument model for a G/K star, not a measurement: a blue arm (response peaking at 5000 A) and a red
    arm (peaking at 7300 A and falling to the red with the CCD's quantum efficiency) split by a dichroic at
    5800 A, where both arms fade and the S/N dips to about 0.4.  The blue arm collects about 0.4 of the red
    arm's photons from such a star, so the blue end has about a third of the peak S/N (LAMOST's S/N in g is
    typically half that in i).
    """
    wave = np.asarray(wavelengths, dtype=np.float64)
    reference = np.linspace(3500.0, 9500.0, 6001)
    peak = float(np.sqrt(_lamost_throughput(reference)).max())
    return np.maximum(np.sqrt(_lamost_throughput(wave)) / peak, 0.02)


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


def write_wavelength_template(path, wavelengths, *, resolution=TUTORIAL_RESOLUTION, line_list="tutorial"):
    """Write a wavelength template (WAVE_TEMPLATE format): the grid and a solar-like synthetic flux.

    The flux column is not used by ANNA-TF; it makes the file a valid example spectrum on the grid
    (:data:`SOLAR_LABELS` through :func:`synthesize`, by default at R = 11000 with the tutorial lines).
    """
    wavelengths = np.asarray(wavelengths, dtype=np.float64).reshape(-1)
    flux = synthesize(wavelengths, np.asarray([SOLAR_LABELS]), resolution=resolution, line_list=line_list)[0]
    _write_two_columns(path, "wavelength_A flux (solar-like synthetic spectrum; flux unused)", wavelengths,
                       flux, ".6f")


def survey_sn_template(name, grid=None):
    """``(wavelengths, relative S/N)`` of the S/N template for the named grid ('apogee' or 'lamost').

    It covers ``grid`` (default: the named grid) with 25 A to spare at both ends, in steps of
    :data:`SURVEY_SN_STEPS` (1 A for APOGEE, fine enough for the 4 A chip edges; 2 A for LAMOST), the values
    from :func:`apogee_relative_sn` or :func:`lamost_relative_sn`.
    """
    if name not in SURVEY_SN_STEPS:
        raise AnnaInputError(f"no survey S/N template for this grid; choose one of {', '.join(SURVEY_SN_STEPS)}",
                             key="grid", value=name)
    grid = survey_grid(name)[0] if grid is None else np.asarray(grid, dtype=np.float64).reshape(-1)
    step = SURVEY_SN_STEPS[name]
    start = step * math.floor((float(grid[0]) - 25.0) / step)
    stop = step * math.ceil((float(grid[-1]) + 25.0) / step)
    wavelengths = _template_grid(start, stop, step)
    profile = apogee_relative_sn if name == "apogee" else lamost_relative_sn
    return wavelengths, profile(wavelengths)


def write_project_templates(folder):
    """(Re)write the templates shipped in ``templates/``; returns ``{kind: path}``.

    ``sn.hydra.template`` [sn_template]: :func:`fibre_relative_sn` on 6450-6850 A at 0.2 A;
    ``wavelength.template`` [wavelength_template]: :func:`default_grid` with a solar-like flux;
    ``sn.apogee.template`` [sn_template_apogee] and ``sn.lamost.template`` [sn_template_lamost]: the survey
    S/N templates of :func:`survey_sn_template`, the same files ``anna-synth --grid apogee|lamost`` writes.
    """
    folder = Path(folder)
    sn_path = folder / "sn.hydra.template"
    wave_path = folder / "wavelength.template"
    sn_grid = _template_grid(SN_TEMPLATE_START, SN_TEMPLATE_START + SN_TEMPLATE_STEP * (SN_TEMPLATE_PIXELS - 1),
                             SN_TEMPLATE_STEP)
    write_sn_template(sn_path, sn_grid, fibre_relative_sn(sn_grid))
    write_wavelength_template(wave_path, default_grid())
    written = {"sn_template": str(sn_path), "wavelength_template": str(wave_path)}
    for name in SURVEY_SN_STEPS:
        path = folder / f"sn.{name}.template"
        write_sn_template(path, *survey_sn_template(name))
        written[f"sn_template_{name}"] = str(path)
    return written


# ---------------------------------------------------------------------------------------------------------
# IRAF multispec output

def _write_star_multispec(path, rng, star_labels, n_apertures, star_sn, resolution, grid,
                          relative_sn=fibre_relative_sn, line_list="tutorial", step=None):
    """Noisy spectra of one star as an IRAF multispec image (apertures x pixels), float32.

    Each aperture has its own linear dispersion (dtype 0): ``w1`` within +-0.6 A of ``grid[0] - 25 A``,
    ``dw`` = 0.9 x ``step`` (default the grid's median step; times 1 +- 2e-4), and ``nw`` up to 12 pixels short
    of the image width, the rest zero-padded as IRAF does.  Noise is photon-like with S/N ``star_sn x
    relative_sn`` at the continuum; each aperture also gets a residual radial velocity (uniform +-0.5 km/s)
    and a small continuum error (offset and tilt, sigma 0.5 %).  Returns the spec strings written into WAT2.
    """
    step = float(np.median(np.diff(grid))) if step is None else float(step)
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
                      resolution=resolution, rv_kms=residual_rv, line_list=line_list)
    sigma = np.sqrt(np.maximum(flux, 0.0)) / (star_sn * relative_sn(wave))
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
                      resolution=None, star_labels=(5770., 4.44, 0.0, 1.0, 3.0), n_apertures=90,
                      star_sn=200.0, line_list=None, progress=None):
    """Write ANNA-TF's example data set into ``outdir`` and return ``{kind: path}``.

    ``grid``: None or 'tutorial' (:func:`default_grid`), 'apogee' (:func:`apogee_grid`), 'lamost'
    (:func:`lamost_grid`) or an array of wavelengths.  ``resolution``: resolving power, by default the named
    grid's (11000 tutorial and arrays, 22500 APOGEE, 1800 LAMOST).  ``line_list``: as in :func:`synthesize`,
    by default 'survey' for the APOGEE and LAMOST grids and 'tutorial' otherwise.

    Files (kinds in brackets): ``train.pack``, ``xval.pack``, ``test.pack`` [train, xval, test] — noise-free
    teaching-model spectra on ``grid`` at resolving power ``resolution``, labels (teff, logg, feh, vmic, vsini)
    uniform in :data:`DEFAULT_LABEL_RANGES`, each spectrum Doppler shifted by a residual velocity uniform in
    +-2 km/s that is stored in the dummy column; ids are 1..n_train, 1000001.., 2000001.. so the three sets
    never share an id.  ``sn.template`` [sn_template]: relative S/N of the spectrograph, covering the grid —
    for the tutorial grid and arrays the example fibre spectrograph (:func:`fibre_relative_sn`, 0.2 A steps
    covering 6450-6850 A and the grid), for 'apogee' and 'lamost' :func:`survey_sn_template` (the same as
    ``templates/sn.apogee.template`` and ``sn.lamost.template``).  ``wavelength.template``
    [wavelength_template]: ``grid`` with a solar-like flux.  ``star_multispec.fits`` [multispec]:
    ``n_apertures`` noisy spectra of one star with labels ``star_labels`` at S/N ``star_sn`` x the S/N
    profile, IRAF multispec format on per-aperture linear grids different from ``grid`` (see
    :func:`_write_star_multispec`; for the survey grids their step is 0.9 x the grid's smallest step and they
    run through the APOGEE chip gaps).  ``star_labels.json`` [star_labels]: that star's true labels by name.

    Deterministic: the same arguments give byte-identical files.  Each product draws from its own random
    stream (spawned from ``seed``), so changing ``n_train`` does not change the test set or the star.
    Cost: the tutorial grid makes thousands of spectra a second; the APOGEE and LAMOST grids about 100 a
    second per core (see :func:`_synthesize_survey`).  ``progress``: None, or an
    :class:`anna.progress.FileProgress` (unit "spectrum") that counts the pack spectra as they are made.
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
    grid_name = "tutorial" if grid is None else grid if isinstance(grid, str) else None
    if grid_name is not None:
        grid, default_resolution = survey_grid(grid_name)
    else:
        grid, default_resolution = np.asarray(grid, dtype=np.float64).reshape(-1), TUTORIAL_RESOLUTION
    if grid.size < 2 or not np.isfinite(grid).all() or not (np.diff(grid) > 0).all() or grid[0] <= 0:
        raise AnnaInputError("grid must hold at least two positive, strictly ascending wavelengths", key="grid")
    resolution = default_resolution if resolution is None else resolution
    survey = grid_name in SURVEY_SN_STEPS
    if line_list is None:
        line_list = "survey" if survey else "tutorial"
    if line_list not in LINE_LISTS:
        raise AnnaInputError(f"line_list must be one of {', '.join(LINE_LISTS)}", key="line_list",
                             value=line_list)

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    streams = [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(4)]
    written = {}
    if progress is not None:
        progress.start(n_train + n_xval + n_test)
    for (kind, count, id_offset), rng in zip((("train", n_train, 0), ("xval", n_xval, 1_000_000),
                                              ("test", n_test, 2_000_000)), streams):
        labels = draw_labels(count, rng)
        residual_rv = rng.uniform(-RESIDUAL_RV_KMS, RESIDUAL_RV_KMS, count)
        flux = np.empty((count, grid.size))
        for start in range(0, count, 2000):
            stop = min(start + 2000, count)
            flux[start:stop] = synthesize(grid, labels[start:stop], resolution=resolution,
                                          rv_kms=residual_rv[start:stop], line_list=line_list)
            if progress is not None:
                progress.advance(stop - start)
        path = outdir / f"{kind}.pack"
        write_pack(path, grid, id_offset + np.arange(1, count + 1), labels, flux, dummy=residual_rv)
        written[kind] = str(path)

    written["sn_template"] = str(outdir / "sn.template")
    if survey:
        write_sn_template(written["sn_template"], *survey_sn_template(grid_name, grid))
        relative_sn = apogee_relative_sn if grid_name == "apogee" else lamost_relative_sn
        step = float(np.diff(grid).min())
    else:
        sn_grid = _template_grid(min(SN_TEMPLATE_START, math.floor(grid[0]) - 25.0),
                                 max(SN_TEMPLATE_START + SN_TEMPLATE_STEP * (SN_TEMPLATE_PIXELS - 1),
                                     math.ceil(grid[-1]) + 25.0), SN_TEMPLATE_STEP)
        write_sn_template(written["sn_template"], sn_grid, fibre_relative_sn(sn_grid))
        relative_sn, step = fibre_relative_sn, None
    written["wavelength_template"] = str(outdir / "wavelength.template")
    write_wavelength_template(written["wavelength_template"], grid, resolution=resolution, line_list=line_list)

    written["multispec"] = str(outdir / "star_multispec.fits")
    _write_star_multispec(written["multispec"], streams[3], star, n_apertures, star_sn, resolution, grid,
                          relative_sn=relative_sn, line_list=line_list, step=step)
    written["star_labels"] = str(outdir / "star_labels.json")
    with atomic_output(written["star_labels"], "w", encoding="utf-8") as handle:
        json.dump({name: float(value) for name, value in zip(DEFAULT_LABEL_NAMES, star)}, handle, indent=2)
        handle.write("\n")
    return written
