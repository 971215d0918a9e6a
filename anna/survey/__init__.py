"""Survey spectrum files (LAMOST, SDSS/BOSS, APOGEE, 1-D FITS with errors): a registry of readers, each with an
``identify`` function that recognises its format from the file's structure (:mod:`anna.survey.registry`).

:func:`read_survey_file` is the entry point; :func:`describe_survey_file` is what ``anna-spectra`` prints.
"""

from anna.survey.registry import SurveySpectrum, identify, read_survey_file, registered_formats

__all__ = ["SurveySpectrum", "identify", "read_survey_file", "registered_formats"]
