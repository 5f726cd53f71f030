"""The paper's suites, for users with internet and a GPU: experts and data from the Hugging Face Hub, pinned.

Three kinds of suite, each defined as data (:class:`SuiteSpec`: model repos + revisions, tasks, dataset sources,
metrics, prompts; the built-in ones are ``builtin/<name>.yaml``) and run by one class:

* ``clip`` (:class:`ClipSuite`): a CLIP base (``CLIPModel``) and one fine-tuned vision tower per task
  (``CLIPVisionModel`` checkpoints, FusionBench's ``tanganke/clip-vit-*_<task>``). Only the vision tower is merged;
  every task is scored zero-shot against a head built from class names and templates with the base's frozen text
  tower (:mod:`samerge.evaluation.templates`). Built in: ``clip-vit-b32``, ``clip-vit-b16``, ``clip-vit-l14``.
* ``seq-cls`` (:class:`SeqClsSuite`): a RoBERTa (any ``AutoModelForSequenceClassification``) base and fully
  fine-tuned GLUE experts; the encoder is merged, each expert's classifier is its own head. Built in:
  ``roberta-base-glue`` and ``roberta-large-glue`` (the latter names no experts: no consistent published set was
  found, so it needs a suite file with yours).
* ``seq2seq-lora`` (:class:`Seq2SeqLoraSuite`): a Flan-T5 base and PEFT LoRA experts (FusionBench's
  ``tanganke/flan-t5-base_glue-<task>_lora-16``); each expert is its dense model W0 + s·BA, label words are
  generated (exact match, as FusionBench scores them) or scored by likelihood. Built in: ``flan-t5-base-lora-glue``.

Scores are one number per task (:mod:`samerge.evaluation.metrics`: MCC for CoLA, the mean of Pearson and Spearman
for STS-B with RoBERTa, Spearman for STS-B with Flan-T5 as FusionBench reports it, the mean of accuracy and F1 for
MRPC/QQP, accuracy elsewhere). ``size="full"`` scores the whole evaluation split, ``size="small"`` a seeded
subsample of ``small_examples`` examples per task; nothing is fine-tuned.

The modules, each importing only ones named before it: :mod:`~samerge.evaluation.hub.spec` (the schema of a suite file,
its validation, the built-ins), :mod:`~samerge.evaluation.hub.download` (Hub snapshots, pinned, cached and recorded)
and :mod:`~samerge.evaluation.hub.readers` (a split's files as columns), :mod:`~samerge.evaluation.hub.suites` (the
suite classes and :func:`load_hub_suite`).
"""

from samerge.evaluation.hub.download import (COMMIT_RE, MODEL_FILES, MODEL_PICKLES, Acquired, Provenance, acquire,
                                             acquire_model, hub_cache_dir, hub_offline)
from samerge.evaluation.hub.readers import IMAGE_SUFFIXES, read_columns
from samerge.evaluation.hub.spec import (BUILTIN_DIR, HUB_SUITES, SUITE_FILE_SUFFIXES, DataSource, ModelSource,
                                         SuiteSpec, TaskSpec, builtin_spec, load_spec_file, validate_spec, write_spec)
from samerge.evaluation.hub.suites import (SIZES, ClipSuite, HubSuite, HubTask, Seq2SeqLoraSuite, SeqClsSuite,
                                           detached_copy, is_hub_suite, load_hub_suite)
from samerge.evaluation.templates import clean_classname, prompts

__all__ = [
    # spec
    "BUILTIN_DIR", "HUB_SUITES", "SUITE_FILE_SUFFIXES", "DataSource", "ModelSource", "SuiteSpec", "TaskSpec",
    "builtin_spec", "load_spec_file", "validate_spec", "write_spec",
    # download
    "COMMIT_RE", "MODEL_FILES", "MODEL_PICKLES", "Acquired", "Provenance", "acquire", "acquire_model",
    "hub_cache_dir", "hub_offline",
    # readers
    "IMAGE_SUFFIXES", "read_columns",
    # suites
    "SIZES", "ClipSuite", "HubSuite", "HubTask", "Seq2SeqLoraSuite", "SeqClsSuite", "detached_copy", "is_hub_suite",
    "load_hub_suite",
    # the CLIP prompts' helpers, as the hub module has always offered them
    "clean_classname", "prompts",
]
