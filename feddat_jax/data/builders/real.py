"""tfds builders for the real datasets, read from a manual directory in each dataset's official format.

Nothing is downloaded: pass the directory holding the official files as `DownloadConfig(manual_dir=...)`
(`load_clients` does). Each builder's `MANUAL_DOWNLOAD_INSTRUCTIONS` lists what that directory must hold.

A client's answer vocabulary is the top-`num_answers` normalised answers of its whole train split
(`answers.build_vocab`). The "fed" config then keeps, like the FedDAT pickles (docs/real_data.md), only
examples with at least one answer in that vocabulary and a seeded random subset of 2,500 train / 500 test
examples (exact sizes here, Bernoulli-approximate there); "full" keeps every example.
"""
from __future__ import annotations

import dataclasses
import io
import os
import pathlib
from typing import Callable, Sequence

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from feddat_jax.data import answers as answers_lib
from feddat_jax.data.builders import common
from feddat_jax.data.builders import formats

Path = pathlib.Path
DataFormatError = formats.DataFormatError


@dataclasses.dataclass
class RealConfig(tfds.core.BuilderConfig):
  """Which examples of the official splits are written; `None` sizes keep them all."""

  num_train: int | None = 2500
  num_test: int | None = 500
  in_vocab_only: bool = True  # keep only examples with >= 1 answer in the client's vocabulary
  num_answers: int = 100
  seed: int = 0


_CONFIGS = [
    RealConfig(name="fed", description="FedDAT-sized clients: 2,500 train / 500 test, in-vocabulary only."),
    RealConfig(name="full", description="Every example of the official splits.", num_train=None, num_test=None,
               in_vocab_only=False),
]


class RealBuilder(common.Builder, skip_registration=True):
  """Shared base: official files -> records -> per-client vocabulary, selection and encoded examples.

  A subclass sets the class attributes and `_read`, which returns {client: (train records, test records)}.
  """

  BUILDER_CONFIGS = _CONFIGS
  MANUAL_DOWNLOAD_INSTRUCTIONS = ""
  SCORE_RULE = "vqa"
  TASK = "vqa"
  NUM_IMAGES = 1

  @property
  def dataset(self) -> str:
    """The dataset's name in errors, `BUILDERS` and the manual root."""
    return self.name.removeprefix("feddat_")

  def _read(self, root: Path) -> dict[str, tuple[list[formats.Record], list[formats.Record]]]:
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    try:
      root = Path(dl_manager.manual_dir)
    except AssertionError:
      # tfds's own message spans several lines; ours names the folder and its contents in one.
      folder = dl_manager._manual_dir  # pylint: disable=protected-access
      raise DataFormatError(f"{self.dataset}: manual dir {folder} is missing or empty; "
                            f"it should hold {self.MANUAL_DOWNLOAD_INSTRUCTIONS}") from None
    cfg = self.builder_config
    clients, splits, total = [], {}, 0
    for client, (train, test) in self._read(root).items():
      vocab = answers_lib.build_vocab(train, cfg.num_answers)
      selected = {"train": self._select(train, vocab, cfg.num_train), "test": self._select(test, vocab, cfg.num_test)}
      for subset, records in selected.items():
        if not records:  # tfds cannot write an empty split
          raise DataFormatError(f"{self.dataset}: client {client} has no {subset} examples with an answer among its "
                                f"top-{cfg.num_answers} train answers")
        _check_images(self.dataset, records)
        splits[f"{client}_{subset}"] = self._generate_examples(records)
        total += len(records)
      clients.append(common.client_meta(client, vocab, self.SCORE_RULE, self.NUM_IMAGES, self.TASK))
    self.info.metadata["clients"] = clients
    return self._with_progress(splits, total)

  def _select(self, records: list[formats.Record], vocab: list[str], size: int | None) -> list[formats.Record]:
    cfg = self.builder_config
    if cfg.in_vocab_only:
      vocab = set(vocab)
      records = [r for r in records if any(answers_lib.normalize_answer(a) in vocab for a in r["answers"])]
    if size is None or size >= len(records):
      return records
    keep = np.random.default_rng(cfg.seed).choice(len(records), size, replace=False)
    return [records[i] for i in sorted(keep)]

  def _generate_examples(self, records: list[formats.Record]):
    for i, r in enumerate(records):
      yield i, dict(question_id=r["question_id"], images=[_image(self.dataset, p) for p in r["image_paths"]],
                    question=r["question"], answers=r["answers"])


def _check_images(dataset: str, records: list[formats.Record]):
  """Fails before anything is written if an image is missing."""
  for r in records:
    for p in r["image_paths"]:
      if not p.is_file():
        raise DataFormatError(f"{dataset}: image {p} of question {r['question_id']} not found")


def _image(dataset: str, path: Path):
  """The file's own bytes when they are an RGB JPEG/PNG (no re-encoding), else an RGB PIL image."""
  data = path.read_bytes()
  try:
    with PIL.Image.open(io.BytesIO(data)) as image:
      if image.mode == "RGB" and image.format in ("JPEG", "PNG"):
        return data
      return image.convert("RGB")
  except (OSError, ValueError) as e:
    raise DataFormatError(f"{dataset}: image {path}: cannot be decoded ({e})") from None


def _first_file(root: Path, names: Sequence[str]) -> Path:
  """The first of `names` (paths under `root`) that is a file: a dataset's official layout as it unpacks and
  the layouts read before. None there: the first, whose parser then reports it missing with its format."""
  for name in names:
    if (root / name).is_file():
      return root / name
  return root / names[0]


def _first_dir(dataset: str, root: Path, names: Sequence[str], what: str) -> Path:
  """The first of `names` (folders under `root`) that exists; a one-line error naming them all if none does."""
  for name in names:
    if (root / name).is_dir():
      return root / name
  raise DataFormatError(f"{dataset}: no {what} folder; expected " + " or ".join(f"{root / n}/" for n in names))


class _VisualGenomeImages:
  """Visual Genome's <image_id>.jpg files: images.zip unpacks to VG_100K/, images2.zip to VG_100K_2/; one
  merged images/ folder (our earlier layout) is read too. Each folder is listed once, on the first lookup."""

  FOLDERS = ("VG_100K", "VG_100K_2", "images")

  def __init__(self, dataset: str, root: Path):
    self.folders = [root / f for f in self.FOLDERS if (root / f).is_dir()]
    if not self.folders:
      raise DataFormatError(f"{dataset}: no Visual Genome image folder; expected {root / 'VG_100K'}/ and "
                            f"{root / 'VG_100K_2'}/ (images.zip, images2.zip) or {root / 'images'}/")
    self._folder_of: dict[str, Path] | None = None

  def __call__(self, name: str) -> Path:
    """The file's path in the first folder holding it (else in the first folder, reported missing later)."""
    if self._folder_of is None:
      self._folder_of = {}
      for folder in reversed(self.folders):  # earlier folders win
        self._folder_of.update(dict.fromkeys(os.listdir(folder), folder))
    return self._folder_of.get(name, self.folders[0]) / name


def _coco_image(folder: Path, split: str) -> Callable[[int], Path]:
  """COCO file-name convention, e.g. train2014/COCO_train2014_000000000009.jpg."""
  return lambda image_id: folder / split / f"COCO_{split}_{image_id:012d}.jpg"


class VqaV2(RealBuilder):
  """VQA v2 (visualqa.org): train2014 -> train, val2014 -> test; the official VQA soft score.

  Format: the download page's question and annotation JSONs (`formats.parse_vqa`), MS-COCO 2014 images.
  """

  name = "feddat_vqa_v2"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "v2_OpenEnded_mscoco_{train,val}2014_questions.json, v2_mscoco_{train,val}2014_annotations.json and "
      "the COCO image folders {train,val}2014/ (COCO_train2014_000000000009.jpg, ...)")

  def _read(self, root):
    def split(s):
      return formats.parse_vqa("vqa_v2", root / f"v2_OpenEnded_mscoco_{s}_questions.json",
                               root / f"v2_mscoco_{s}_annotations.json", _coco_image(root, s))
    return {"vqa": (split("train2014"), split("val2014"))}


class VqaAbstract(RealBuilder):
  """VQA Abstract Scenes v002 (visualqa.org): train2015 -> train, val2015 -> test; FedDAT's "climb" score.

  Format: the same question/annotation JSONs as VQA (`formats.parse_vqa`); images from
  scene_img_abstract_v002_<split>.zip, named abstract_v002_<split>_<12-digit image id>.png.
  """

  name = "feddat_vqa_abstract"
  SCORE_RULE = "climb"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "OpenEnded_abstract_v002_{train,val}2015_questions.json, abstract_v002_{train,val}2015_annotations.json "
      "and the image folders scene_img_abstract_v002_{train,val}2015/ (abstract_v002_train2015_000000000000.png, "
      "...)")

  def _read(self, root):
    def split(s):
      folder = root / f"scene_img_abstract_v002_{s}"
      return formats.parse_vqa("vqa_abstract", root / f"OpenEnded_abstract_v002_{s}_questions.json",
                               root / f"abstract_v002_{s}_annotations.json",
                               lambda image_id: folder / f"abstract_v002_{s}_{image_id:012d}.png")
    return {"abstract": (split("train2015"), split("val2015"))}


class VizWiz(RealBuilder):
  """VizWiz-VQA (vizwiz.org): train -> train, val -> test (test has no answers); FedDAT's "climb" score.

  Format: Annotations.zip's train.json / val.json (`formats.parse_vizwiz`), images from train.zip / val.zip.
  """

  name = "feddat_vizwiz"
  SCORE_RULE = "climb"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "train.json and val.json (VizWiz-VQA annotations, at the top or in Annotations/ as Annotations.zip "
      "unpacks) and the image folders train/ and val/ (VizWiz_train_00000000.jpg, ...)")

  def _read(self, root):
    return {"vizwiz": tuple(formats.parse_vizwiz(_first_file(root, [f"{s}.json", f"Annotations/{s}.json"]), root / s)
                            for s in ("train", "val"))}


class Gqa(RealBuilder):
  """GQA balanced questions (cs.stanford.edu/people/dorarad/gqa): train -> train, val -> test (as FedDAT).

  Format: questions1.2's *_balanced_questions.json (`formats.parse_gqa`), images/<imageId>.jpg; FedDAT's
  1/count score.
  """

  name = "feddat_gqa"
  SCORE_RULE = "inverse_count"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "train_balanced_questions.json, val_balanced_questions.json and the images/ folder (<imageId>.jpg)")

  def _read(self, root):
    return {"gqa": tuple(formats.parse_gqa(root / f"{s}_balanced_questions.json", root / "images")
                         for s in ("train", "val"))}


class CocoQa(RealBuilder):
  """COCO-QA (Toronto; Ren et al. 2015): train/ -> train, test/ -> test; FedDAT's 1/count score.

  Format: cocoqa-2015-05-17.zip's per-split text files (`formats.parse_coco_qa`); COCO-QA's train questions
  use MS-COCO train2014 images and its test questions val2014 images.
  """

  name = "feddat_coco_qa"
  SCORE_RULE = "inverse_count"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "train/ and test/, each with questions.txt, answers.txt and img_ids.txt, and the COCO image folders "
      "train2014/ and val2014/")

  def _read(self, root):
    return {"cocoqa": (formats.parse_coco_qa(root / "train", _coco_image(root, "train2014")),
                        formats.parse_coco_qa(root / "test", _coco_image(root, "val2014")))}


class Aqua(RealBuilder):
  """AQUA (github.com/noagarcia/ArtVQA): train.json -> train, test.json -> test; FedDAT's 1/count score.

  Format: the AQUA JSONs (`formats.parse_aqua`); images in SemArt/Images/ as SemArt.zip unpacks (or Images/).
  """

  name = "feddat_aqua"
  SCORE_RULE = "inverse_count"
  MANUAL_DOWNLOAD_INSTRUCTIONS = "train.json and test.json (AQUA) and SemArt/Images/ (or Images/) from SemArt.zip"

  def _read(self, root):
    images = _first_dir(self.dataset, root, ["SemArt/Images", "Images"], "SemArt image")
    return {"art": tuple(formats.parse_aqua(root / f"{s}.json", images) for s in ("train", "test"))}


class _Clove(RealBuilder, skip_registration=True):
  """CLOVE (github.com/showlab/CLVQA, CLOVE-json.zip): fcl_mmf_<stage>_train.json -> train, _val -> test.

  The CLVQA README documents one sample's fields, not the json files' layout; we assume each file is a JSON
  list of samples named like the npy release (`CL_constant.py`), see `formats.parse_clove`. Images are
  Visual Genome's, in VG_100K/ and VG_100K_2/ as images.zip and images2.zip unpack (or one images/ folder).
  Score rule "climb": FedDAT's 1/count test matches "clova", not "clove", so CLOVE clients fall to the
  VQA-style get_score.
  """

  SCORE_RULE = "climb"
  STAGES: dict[str, str] = {}  # client name -> CLOVE stage name, in FedDAT's client order

  def _read(self, root):
    images = _VisualGenomeImages(self.dataset, root)
    return {client: tuple(formats.parse_clove(self.dataset, root / f"fcl_mmf_{stage}_{s}.json", images)
                          for s in ("train", "val"))
            for client, stage in self.STAGES.items()}


class CloveFunction(_Clove):
  """CLOVE function-incremental stages a..e of FedDAT (scene-text is not used)."""

  name = "feddat_clove_function"
  STAGES = {"attribute": "attribute", "knowledge": "knowledge", "logical": "logical", "object": "object",
            "relation": "relation"}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "fcl_mmf_{attribute,knowledge,logical,object,relation}_{train,val}.json and Visual Genome's VG_100K/ and "
      "VG_100K_2/ (or one images/ folder) with <image_id>.jpg")


class CloveScene(_Clove):
  """CLOVE scene-incremental stages a..f."""

  name = "feddat_clove_scene"
  STAGES = {"shop": "a#ShopAndDining", "workplace": "b#Workplace", "home": "c#HomeOrHotel",
            "transport": "d#Transportation", "sport": "e#SportAndLeisure", "outdoors": "f#Outdoors"}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "fcl_mmf_{a#ShopAndDining,b#Workplace,c#HomeOrHotel,d#Transportation,e#SportAndLeisure,f#Outdoors}_"
      "{train,val}.json and Visual Genome's VG_100K/ and VG_100K_2/ (or one images/ folder) with <image_id>.jpg")


class Nlvr2(RealBuilder):
  """NLVR2 (lil.nlp.cornell.edu/nlvr): train.json -> train, dev.json -> test (test1.json without a dev.json);
  two images per statement.

  Format: the repository's JSON-lines files (`formats.parse_nlvr2`), at the top or in nlvr2/data/ (a clone of
  lil-lab/nlvr) or data/; answers "true"/"false", scored 1.0. Images as the zips unpack: images/train/<directory>/,
  dev/ and test1/ (images/dev/ and images/test1/ are read too). The test split is dev, the validation split, as
  for every other dataset here and in CLiMB's NLVR2 loader that FedDAT builds on ("val" -> dev).
  """

  name = "feddat_nlvr2"
  SCORE_RULE = "inverse_count"
  TASK = "nlvr2"
  NUM_IMAGES = 2
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "train.json and dev.json (or test1.json) as JSON lines, at the top or in nlvr2/data/, and the images "
      "images/train/<directory>/ and dev/ (or test1/) (<split>-<set>-<pair>-img0.png, -img1.png)")

  def _annotations(self, root: Path, split: str) -> Path:
    return _first_file(root, [f"{split}.json", f"nlvr2/data/{split}.json", f"data/{split}.json"])

  def _read(self, root):
    test = "dev" if self._annotations(root, "dev").is_file() else "test1"
    folders = {"train": ["images/train"], test: [test, f"images/{test}"]}
    return {"nlvr2": tuple(
        formats.parse_nlvr2(self._annotations(root, s), _first_dir(self.dataset, root, folders[s], f"{s} image"))
        for s in ("train", test))}


class SnliVe(RealBuilder):
  """SNLI-VE (github.com/necla-ml/SNLI-VE): train -> train, test -> test; 3-way entailment, scored 1.0.

  Format: snli_ve_{train,test}.jsonl (`formats.parse_snli_ve`); Flickr30k images in flickr30k-images/ as
  flickr30k-images.tar.gz unpacks (or flickr30k_images/).
  """

  name = "feddat_snli_ve"
  SCORE_RULE = "inverse_count"
  TASK = "ve"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "snli_ve_train.jsonl, snli_ve_test.jsonl and flickr30k-images/ (or flickr30k_images/) with <id>.jpg")

  def _read(self, root):
    images = _first_dir(self.dataset, root, ["flickr30k-images", "flickr30k_images"], "Flickr30k image")
    return {"ve": tuple(formats.parse_snli_ve(root / f"snli_ve_{s}.jsonl", images) for s in ("train", "test"))}


BUILDERS = {b.name.removeprefix("feddat_"): b for b in (
    VqaV2, VqaAbstract, VizWiz, Gqa, CocoQa, Aqua, CloveFunction, CloveScene, Nlvr2, SnliVe)}
"""Real-format builders by dataset name; each reads `<manual root>/<dataset name>/` in `load_clients`."""
