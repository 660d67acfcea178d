"""tfds builders: official formats -> common schema, one-line format errors, synthetic round trip."""
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from feddat_jax.data import answers as answers_lib
from feddat_jax.data import synthetic
from feddat_jax.data.builders import REAL_BENCHMARKS, DataFormatError, load_clients
from feddat_jax.data.builders import real
from feddat_jax.data.builders import synthetic_builder

RED, GREEN, BLUE, GREY = (200, 30, 30), (30, 200, 30), (30, 30, 200), (128, 128, 128)
TEN = ["cat"] * 7 + ["dog"] * 3  # ten annotators


def _image(path: pathlib.Path, color, mode="RGB"):
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.new("RGB", (5, 4), color).convert(mode).save(path)


def _json(path: pathlib.Path, data):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(data))


def _jsonl(path: pathlib.Path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _items(ten: bool):
  """(train, test) items (question, answers, image colours) of a small client."""
  many = TEN if ten else ["cat"]
  train = [("what animal is it?", many, [RED]), ("what color is it?", ["blue"] * len(many), [GREY]),
           ("what animal is this?", many, [GREEN])]
  return train, [("how many?", ["2"] * len(many), [BLUE])]


# One writer per official format: writes (train, test) items under `root` in that format.


def _write_vqa(root, items, *, abstract):
  splits = ("train2015", "val2015") if abstract else ("train2014", "val2014")
  for split, split_items in zip(splits, items):
    qs, anns = [], []
    for i, (q, answers, (color,)) in enumerate(split_items):
      qid, image_id = 1000 + i, 7 + i
      qs.append(dict(image_id=image_id, question=q, question_id=qid))
      anns.append(dict(question_id=qid, image_id=image_id, multiple_choice_answer=answers[0],
                       answers=[dict(answer=a, answer_confidence="yes", answer_id=j) for j, a in enumerate(answers)]))
      if abstract:
        _image(root / f"scene_img_abstract_v002_{split}" / f"abstract_v002_{split}_{image_id:012d}.png", color)
      else:
        # The grey one is a grayscale JPEG, as some COCO images are; it must read back as RGB.
        _image(root / split / f"COCO_{split}_{image_id:012d}.jpg", color, "L" if color == GREY else "RGB")
    prefix = "OpenEnded_abstract_v002" if abstract else "v2_OpenEnded_mscoco"
    _json(root / f"{prefix}_{split}_questions.json", dict(info={}, task_type="Open-Ended", questions=qs))
    _json(root / f"{'abstract_v002' if abstract else 'v2_mscoco'}_{split}_annotations.json",
          dict(info={}, annotations=anns))


def _write_vizwiz(root, items, annotations="."):
  """annotations: the folder of {train,val}.json ("Annotations" as Annotations.zip unpacks)."""
  for split, split_items in zip(("train", "val"), items):
    rows = []
    for i, (q, answers, (color,)) in enumerate(split_items):
      image = f"VizWiz_{split}_{i:08d}.jpg"
      rows.append(dict(image=image, question=q, answerable=1, answer_type="other",
                       answers=[dict(answer=a, answer_confidence="yes") for a in answers]))
      _image(root / split / image, color)
    _json(root / annotations / f"{split}.json", rows)


def _write_gqa(root, items):
  for split, split_items in zip(("train", "val"), items):
    questions = {}
    for i, (q, (a,), (color,)) in enumerate(split_items):
      questions[f"{split}{i:05d}"] = dict(imageId=f"n{split}{i}", question=q, answer=a, fullAnswer=f"It is {a}.")
      _image(root / "images" / f"n{split}{i}.jpg", color)
    _json(root / f"{split}_balanced_questions.json", questions)


def _write_coco_qa(root, items):
  for split, coco, split_items in zip(("train", "test"), ("train2014", "val2014"), items):
    (root / split).mkdir(parents=True)
    for name, column in (("questions", [q for q, _, _ in split_items]), ("answers", [a for _, (a,), _ in split_items]),
                         ("img_ids", [str(40 + i) for i in range(len(split_items))]),
                         ("types", ["0"] * len(split_items))):
      (root / split / f"{name}.txt").write_text("\n".join(column) + "\n")
    for i, (_, _, (color,)) in enumerate(split_items):
      _image(root / coco / f"COCO_{coco}_{40 + i:012d}.jpg", color)


def _write_aqua(root, items, images="Images"):
  for split, split_items in zip(("train", "test"), items):
    rows = []
    for i, (q, (a,), (color,)) in enumerate(split_items):
      rows.append(dict(image=f"{split}{i}-painting.jpg", question=q, answer=a, need_external_knowledge=False))
      _image(root / images / f"{split}{i}-painting.jpg", color)
    _json(root / f"{split}.json", rows)


def _write_clove(root, items, stages, visual_genome=False):
  """visual_genome: images alternately in VG_100K/ and VG_100K_2/ (images.zip, images2.zip) instead of images/."""
  for stage in stages:
    for split, split_items in zip(("train", "val"), items):
      rows = []
      for i, (q, answers, (color,)) in enumerate(split_items):
        image_id = f"{len(stage)}{i}{split}"
        rows.append(dict(question_id=f"g{stage[:3]}{split}{i}", image_id=image_id, image_source="vg", question=q,
                         answer=answers[0], answers=answers, set_name=split, stage=stage))
        folder = ("VG_100K", "VG_100K_2")[i % 2] if visual_genome else "images"
        _image(root / folder / f"{image_id}.jpg", color)
      _json(root / f"fcl_mmf_{stage}_{split}.json", rows)


def _write_nlvr2(root, items, test="test1", official=False):
  """official: as the zips and a clone of lil-lab/nlvr unpack: nlvr2/data/<split>.json, images/train/<directory>/,
  and the test images in <test>/ (not images/<test>/)."""
  for split, split_items in zip(("train", test), items):
    rows = []
    for i, (q, (a,), colors) in enumerate(split_items):
      row = dict(identifier=f"{split}-{i}-0-1", sentence=q, label=a.capitalize(), synset="dog", query="dogs")
      folder = root / split if official and split != "train" else root / "images" / split
      if split == "train":
        row["directory"] = i % 2
        folder /= str(i % 2)
      rows.append(row)
      for side, color in enumerate(colors):
        _image(folder / f"{split}-{i}-0-img{side}.png", color)
    _jsonl(root / ("nlvr2/data" if official else ".") / f"{split}.json", rows)


def _write_snli_ve(root, items, images="flickr30k_images"):
  for split, first_id, split_items in zip(("train", "test"), (300, 400), items):
    rows = []
    for i, (q, (a,), (color,)) in enumerate(split_items):
      image = f"{first_id + i}.jpg"
      rows.append(dict(pairID=f"{split}{i}n", Flikr30kID=image, captionID=f"{image}#0", sentence1="A caption.",
                       sentence2=q, gold_label=a, annotator_labels=[a]))
      _image(root / images / image, color)
    _jsonl(root / f"snli_ve_{split}.jsonl", rows)


_FUNCTION = ("attribute", "knowledge", "logical", "object", "relation")
_SCENE = ("a#ShopAndDining", "b#Workplace", "c#HomeOrHotel", "d#Transportation", "e#SportAndLeisure", "f#Outdoors")
_TWO_IMAGES = ([("the left image has a dog", ["true"], [RED, BLUE]), ("both images have dogs", ["false"], [GREEN, RED]),
                ("there are two dogs", ["true"], [BLUE, BLUE])], [("one dog", ["false"], [GREY, RED])])
_VE = ([("a dog runs", ["entailment"], [RED]), ("a cat sleeps", ["contradiction"], [BLUE]),
        ("a dog is old", ["neutral"], [GREEN])], [("a dog sits", ["entailment"], [GREY])])

# dataset: (writer, items, client names, score rule, num images, task)
CASES = {
    "vqa_v2": (lambda r, it: _write_vqa(r, it, abstract=False), _items(True), ["vqa"], "vqa", 1, "vqa"),
    "vqa_abstract": (lambda r, it: _write_vqa(r, it, abstract=True), _items(True), ["abstract"], "climb", 1, "vqa"),
    "vizwiz": (_write_vizwiz, _items(True), ["vizwiz"], "climb", 1, "vqa"),
    "gqa": (_write_gqa, _items(False), ["gqa"], "inverse_count", 1, "vqa"),
    "coco_qa": (_write_coco_qa, _items(False), ["cocoqa"], "inverse_count", 1, "vqa"),
    "aqua": (_write_aqua, _items(False), ["art"], "inverse_count", 1, "vqa"),
    "clove_function": (lambda r, it: _write_clove(r, it, _FUNCTION), _items(True), list(_FUNCTION), "climb", 1,
                       "vqa"),
    "clove_scene": (lambda r, it: _write_clove(r, it, _SCENE), _items(True),
                    ["shop", "workplace", "home", "transport", "sport", "outdoors"], "climb", 1, "vqa"),
    "nlvr2": (_write_nlvr2, _TWO_IMAGES, ["nlvr2"], "inverse_count", 2, "nlvr2"),
    "snli_ve": (_write_snli_ve, _VE, ["ve"], "inverse_count", 1, "ve"),
}


def _manual(tmp_path, dataset):
  root = tmp_path / "manual"
  CASES[dataset][0](root / dataset, CASES[dataset][1])
  return root


def _check_clients(clients, dataset):
  """The clients read back are CASES[dataset]'s items, in order, with their images."""
  _, (train, test), names, rule, num_images, task = CASES[dataset]
  assert [c.name for c in clients] == names
  for c in clients:
    assert (c.score_rule, c.num_images, c.task) == (rule, num_images, task)
    assert c.answers == answers_lib.build_vocab(c.train, 100)
    for got, want in ((c.train, train), (c.test, test)):
      assert [(e["question"], e["answers"]) for e in got] == [(q, a) for q, a, _ in want]
      assert len({e["question_id"] for e in got}) == len(want)
      for e, (_, _, colors) in zip(got, want):
        assert len(e["images"]) == len(colors)
        for image, color in zip(e["images"], colors):
          assert image.dtype == np.uint8 and image.shape == (4, 5, 3)
          np.testing.assert_allclose(image.mean((0, 1)), color, atol=4)  # JPEG is lossy


@pytest.mark.parametrize("dataset", sorted(CASES))
def test_real_builder_parses_official_format(tmp_path, dataset):
  _check_clients(load_clients(dataset, tmp_path / "tfds", manual_dir=_manual(tmp_path, dataset), config="full"),
                 dataset)


# Official layouts as the archives unpack (CASES writes the layouts read before, which are still read).
LAYOUTS = {
    "nlvr2_dev": ("nlvr2", lambda r, it: _write_nlvr2(r, it, test="dev", official=True), "dev-"),
    "nlvr2_test1": ("nlvr2", lambda r, it: _write_nlvr2(r, it, official=True), "test1-"),
    "flickr30k": ("snli_ve", lambda r, it: _write_snli_ve(r, it, images="flickr30k-images"), "test"),
    "visual_genome": ("clove_function", lambda r, it: _write_clove(r, it, _FUNCTION, visual_genome=True), "gatt"),
    "semart": ("aqua", lambda r, it: _write_aqua(r, it, images="SemArt/Images"), "test_0"),
    "vizwiz_annotations": ("vizwiz", lambda r, it: _write_vizwiz(r, it, annotations="Annotations"), "VizWiz_val"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_real_builder_reads_official_layout(tmp_path, layout):
  dataset, write, test_id = LAYOUTS[layout]
  root = tmp_path / "manual"
  write(root / dataset, CASES[dataset][1])
  clients = load_clients(dataset, tmp_path / "tfds", manual_dir=root, config="full")
  _check_clients(clients, dataset)
  assert clients[0].test[0]["question_id"].startswith(test_id)


def test_nlvr2_tests_on_dev_when_there_is_one(tmp_path):
  """With both dev.json and test1.json, dev (the validation split) is the test split."""
  root = tmp_path / "manual"
  _write_nlvr2(root / "nlvr2", CASES["nlvr2"][1])  # train.json, test1.json, images/test1/ at the top
  _write_nlvr2(root / "nlvr2", ([], [("two dogs", ["true"], [RED, GREEN])]), test="dev", official=True)
  (client,) = load_clients("nlvr2", tmp_path / "tfds", manual_dir=root, config="full")
  assert [(e["question_id"], e["question"]) for e in client.test] == [("dev-0-0-1", "two dogs")]
  assert len(client.train) == 3


def test_fed_config_keeps_in_vocabulary_examples_and_subsamples(tmp_path):
  root = tmp_path / "manual"
  train, _ = _items(False)
  _write_gqa(root / "gqa", (train, [("what is it?", ["zebra"], [RED]), ("what animal?", ["Cat."], [BLUE])]))
  full, = load_clients("gqa", tmp_path / "tfds", manual_dir=root, config="full")
  fed, = load_clients("gqa", tmp_path / "tfds", manual_dir=root)
  assert full.answers == fed.answers == ["cat", "blue"]
  assert [e["answers"] for e in full.test] == [["zebra"], ["Cat."]]
  assert [e["answers"] for e in fed.test] == [["Cat."]]  # normalised answers decide membership
  small, = load_clients("gqa", tmp_path / "tfds", manual_dir=root,
                        config=real.RealConfig(name="two", num_train=2, num_test=None))
  assert len(small.train) == 2 and {e["question_id"] for e in small.train} < {e["question_id"] for e in full.train}
  _write_gqa(root / "gqa", (train, [("what is it?", ["zebra"], [RED])]))
  with pytest.raises(DataFormatError, match="gqa: client gqa has no test examples with an answer among its top-100"):
    load_clients("gqa", tmp_path / "tfds2", manual_dir=root)


def test_real_benchmark_reads_one_folder_per_dataset(tmp_path):
  root = tmp_path / "manual"
  for dataset in REAL_BENCHMARKS["domain"]:
    CASES[dataset][0](root / dataset, CASES[dataset][1])
  clients = load_clients("domain", tmp_path / "tfds", manual_dir=root, config="full")
  # Real and synthetic clients line up one to one.
  assert [c.name for c in clients] == synthetic.client_names("domain")
  assert CASES["clove_function"][2] == synthetic.client_names("function")
  assert CASES["clove_scene"][2] == synthetic.client_names("scene")
  assert [c.score_rule for c in clients] == ["inverse_count", "climb", "climb", "inverse_count", "inverse_count"]
  with pytest.raises(ValueError, match="pass manual_dir"):
    load_clients("domain", tmp_path / "tfds")
  with pytest.raises(ValueError, match="unknown spec 'vqa3'"):
    load_clients("vqa3", tmp_path / "tfds", manual_dir=root)


def _load_error(tmp_path, dataset, root) -> str:
  with pytest.raises(DataFormatError) as e:
    load_clients(dataset, tmp_path / "tfds", manual_dir=root, config="full")
  message = str(e.value)
  assert "\n" not in message
  return message


def test_missing_manual_dir(tmp_path):
  message = _load_error(tmp_path, "vizwiz", tmp_path / "nowhere")
  assert f"vizwiz: manual dir {tmp_path / 'nowhere' / 'vizwiz'} is missing or empty" in message
  assert "train.json and val.json" in message


@pytest.mark.parametrize("break_it, expected", [
    (lambda r: (r / "val.json").unlink(),
     "val.json: file not found; expected a JSON list of {image, question, answers"),
    (lambda r: (r / "train.json").write_text("{not json"), "train.json: invalid JSON (Expecting property name"),
    (lambda r: _json(r / "train.json", {"image": "x.jpg"}),
     "train.json: the file is a JSON object, not a JSON list; expected a JSON list of {image, question, answers"),
    (lambda r: _json(r / "train.json", [dict(image="VizWiz_train_00000000.jpg", question="q?")]),
     "train.json: record 0 has no 'answers'"),
    (lambda r: _json(r / "train.json", [dict(image="i.jpg", question="q?", answers="yes")]),
     "train.json: record 0 is a string, not a JSON list"),
    (lambda r: (r / "train" / "VizWiz_train_00000001.jpg").unlink(),
     "vizwiz: image {r}/train/VizWiz_train_00000001.jpg of question VizWiz_train_00000001 not found"),
    (lambda r: (r / "train" / "VizWiz_train_00000001.jpg").write_bytes(b"not an image"),
     "vizwiz: image {r}/train/VizWiz_train_00000001.jpg: cannot be decoded"),
])
def test_vizwiz_errors(tmp_path, break_it, expected):
  root = _manual(tmp_path, "vizwiz")
  break_it(root / "vizwiz")
  assert expected.replace("{r}", str(root / "vizwiz")) in _load_error(tmp_path, "vizwiz", root)


@pytest.mark.parametrize("dataset, break_it, expected", [
    ("vqa_v2", lambda r: _json(r / "v2_mscoco_val2014_annotations.json", {"annotations": []}),
     "v2_mscoco_val2014_annotations.json: no annotation for question_id 1000 of "
     "v2_OpenEnded_mscoco_val2014_questions.json"),
    ("vqa_abstract", lambda r: _json(r / "OpenEnded_abstract_v002_train2015_questions.json", {"info": {}}),
     "OpenEnded_abstract_v002_train2015_questions.json: the file has no 'questions'; expected a JSON object "
     '{"questions": [{question_id, image_id, question}, ...]}'),
    ("vqa_v2", lambda r: (r / "val2014" / "COCO_val2014_000000000007.jpg").unlink(),
     "vqa_v2: image {r}/val2014/COCO_val2014_000000000007.jpg of question 1000 not found"),
    ("gqa", lambda r: _json(r / "train_balanced_questions.json", []),
     "train_balanced_questions.json: the file is a JSON list, not a JSON object"),
    ("gqa", lambda r: _json(r / "val_balanced_questions.json", {"q": {"question": "q?", "answer": "a"}}),
     "val_balanced_questions.json: question q has no 'imageId'"),
    ("coco_qa", lambda r: (r / "test" / "answers.txt").write_text("a\nb\n"),
     "test/answers.txt: 2 lines but questions.txt has 1"),
    ("coco_qa", lambda r: (r / "train" / "img_ids.txt").write_text("40\nCOCO_1\n42\n"),
     "train/img_ids.txt: line 2 is 'COCO_1', not a COCO image id"),
    ("aqua", lambda r: (r / "test.json").unlink(), "aqua: {r}/test.json: file not found"),
    ("aqua", lambda r: shutil.rmtree(r / "Images"),
     "aqua: no SemArt image folder; expected {r}/SemArt/Images/ or {r}/Images/"),
    ("clove_function", lambda r: _json(r / "fcl_mmf_logical_train.json", [{"question": "q?"}]),
     "fcl_mmf_logical_train.json: record 0 has no 'answers'"),
    ("nlvr2", lambda r: (r / "test1.json").write_text('{"identifier": "test1-0-0-1", "sentence": "s", "label": "yes"}'),
     "test1.json: line 1 has label 'yes'"),
    ("nlvr2", lambda r: (r / "train.json").write_text('{"identifier": "x"}\n[1, 2]\n'),
     "train.json: line 2 is a JSON list, not a JSON object"),
    ("nlvr2", lambda r: (r / "train.json").write_text('{"identifier": "x", "label": "True"}\n'),
     "train.json: line 1 has no 'sentence'"),
    ("snli_ve", lambda r: (r / "snli_ve_train.jsonl").write_text('{"pairID": "p"}\n{bad\n'),
     "snli_ve_train.jsonl: line 2: invalid JSON"),
    ("snli_ve", lambda r: shutil.rmtree(r / "flickr30k_images"),
     "snli_ve: no Flickr30k image folder; expected {r}/flickr30k-images/ or {r}/flickr30k_images/"),
    ("nlvr2", lambda r: shutil.rmtree(r / "images" / "test1"),
     "nlvr2: no test1 image folder; expected {r}/test1/ or {r}/images/test1/"),
    ("clove_scene", lambda r: shutil.rmtree(r / "images"),
     "clove_scene: no Visual Genome image folder; expected {r}/VG_100K/ and {r}/VG_100K_2/ (images.zip, "
     "images2.zip) or {r}/images/"),
    ("clove_function", lambda r: (r / "images" / "90train.jpg").rename(r / "images" / "x.jpg"),
     "clove_function: image {r}/images/90train.jpg of question gatttrain0 not found"),
])
def test_format_errors(tmp_path, dataset, break_it, expected):
  root = _manual(tmp_path, dataset)
  break_it(root / dataset)
  assert expected.replace("{r}", str(root / dataset)) in _load_error(tmp_path, dataset, root)


def test_synthetic_round_trip(tmp_path):
  kwargs = dict(seed=3, scale=0.01, image_size=16)
  clients = load_clients("synthetic/task", tmp_path, **kwargs)
  expected = synthetic.make_benchmark("task", **kwargs)
  assert [c.name for c in clients] == [c.name for c in expected]
  for got, want in zip(clients, expected):
    assert (got.answers, got.score_rule, got.num_images, got.task) == (
        want.answers, want.score_rule, want.num_images, want.task)
    for got_split, want_split in ((got.train, want.train), (got.test, want.test)):
      assert len(got_split) == len(want_split)
      for g, w in zip(got_split, want_split):
        assert (g["question_id"], g["question"], g["answers"]) == (w["question_id"], w["question"], w["answers"])
        assert len(g["images"]) == len(w["images"])
        for gi, wi in zip(g["images"], w["images"]):
          np.testing.assert_array_equal(gi, wi)
  assert clients[0].train[-1]["question_id"] == expected[0].train[-1]["question_id"]
  # The same files through the plain tfds API.
  config = synthetic_builder.synthetic_config("task", **kwargs)
  source = tfds.data_source("feddat_synthetic", split="vqa_test", data_dir=tmp_path, download=False,
                            builder_kwargs=dict(config=config, file_format="array_record"))
  assert source[0]["question"].decode() == expected[0].test[0]["question"]


def test_building_shows_progress_and_a_summary(tmp_path, capsys, monkeypatch):
  """Generating a dataset: a bar with examples/s (on a terminal; forced on here), then one summary line; reading
  it back later: neither."""
  from feddat_jax.data.builders import common
  bars = []

  class Bar(common.tqdm):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **{**kwargs, "disable": False})
      bars.append(self)

  monkeypatch.setattr(common, "tqdm", Bar)
  kwargs = dict(seed=4, scale=0.01, image_size=16)
  clients = load_clients("synthetic/task", tmp_path, **kwargs)
  total = sum(len(c.train) + len(c.test) for c in clients)
  (bar,) = bars
  captured = capsys.readouterr()
  assert bar.n == bar.total == total and "examples/s" in captured.err and "building feddat_synthetic/" in captured.err
  summary = [line for line in captured.out.splitlines() if line.startswith("data: built")]
  assert len(summary) == 1 and f": {total} examples in " in summary[0] and str(tmp_path) in summary[0], captured.out
  load_clients("synthetic/task", tmp_path, **kwargs)
  assert len(bars) == 1 and "data: built" not in capsys.readouterr().out


def test_two_processes_building_one_dataset_take_turns(tmp_path):
  """Two processes (a sweep's runs, a pod's hosts) asking for the same dataset in one data_dir at once: one builds
  it, the other waits and reads it (without the lock both built it and the second failed to rename its copy)."""
  code = ("import sys; from feddat_jax.data.builders import load_clients; "
          "clients = load_clients('synthetic/function', sys.argv[1], scale=0.02); "
          "print(sum(len(c.train) for c in clients))")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err[-1500:] for _, err in outs]
  assert [out.splitlines()[-1] for out, _ in outs] == [str(sum(len(c.train) for c in load_clients(
      "synthetic/function", tmp_path, scale=0.02)))] * 2
  assert sum("data: built" in out for out, _ in outs) == 1


def test_vilt_preprocessing_of_a_real_format_dataset(tmp_path):
  """image_preprocess="vilt" on a GQA folder of photos of several shapes: every batch is on one canvas, with the
  pixels of `vilt_preprocess.preprocess` and a pixel mask that is False exactly on the padding. Tiny sizes
  (shorter side 64, 16-pixel patches: canvases 64x64, 64x96, 96x64, 96x96) since only the logic is checked."""
  from feddat_jax.data import pipeline, tokenizer, vilt_preprocess
  shapes = {"train": [(60, 90), (90, 60), (50, 50)], "val": [(40, 200)]}  # (height, width)
  rng = np.random.default_rng(0)  # noise photos, stored as JPEG as GQA ships them
  root, images = tmp_path / "data" / "gqa", {}
  for split, split_shapes in shapes.items():
    questions = {}
    for i, (h, w) in enumerate(split_shapes):
      questions[f"{split}{i}"] = dict(imageId=f"{split}{i}", question="what animal is it?", answer="cat")
      images[f"{split}{i}"] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      (root / "images").mkdir(parents=True, exist_ok=True)
      PIL.Image.fromarray(images[f"{split}{i}"]).save(root / "images" / f"{split}{i}.jpg")
    _json(root / f"{split}_balanced_questions.json", questions)
  clients = load_clients("gqa", tmp_path / "tfds", manual_dir=tmp_path / "data")
  data = pipeline.FederatedData(clients, tokenizer.SyntheticTokenizer(), image_hw=(64, 64), text_len=8,
                                batch_size=2, image_preprocess="vilt", size_divisor=16)
  # 60x90 -> 64x96, 90x60 -> 96x64, 50x50 -> 64x64, 40x200 -> 32x96 (the longer side capped at 106, floored).
  assert data.image_hw == (96, 96)
  for split, batches in (("train", data.eval_batches("train")), ("test", data.eval_batches("test"))):
    pixels, mask = batches[0]["pixel_values"][0], batches[0]["pixel_mask"][0]  # [S, B, 1, H, W(, 3)]
    assert pixels.shape[-3:] == (96, 96, 3) and pixels.dtype == np.uint8 and mask.dtype == bool
    examples = getattr(clients[0], split)
    for i, ex in enumerate(examples):
      (image,) = ex["images"]  # the stored JPEG decoded, at the photo's own size
      assert image.shape == images[ex["question_id"]].shape
      want_pixels, want_mask = vilt_preprocess.preprocess(image, (96, 96), shortest_edge=64, size_divisor=16,
                                                          normalize_pixels=False)
      got_pixels, got_mask = pixels[i // 2, i % 2, 0], mask[i // 2, i % 2, 0]
      np.testing.assert_array_equal(got_mask, want_mask)
      np.testing.assert_array_equal(got_pixels, want_pixels)
      h, w = vilt_preprocess.resized_shape(*image.shape[:2], 64, 16)
      assert got_mask[:h, :w].all() and got_mask.sum() == h * w and not got_pixels[~got_mask].any()
  # A training round has the same canvas (one shape for every round and evaluation).
  round_batches, _ = data.round_batches(0, [0])
  assert round_batches["pixel_values"].shape[-3:] == (96, 96, 3)


def test_the_generator_hash_follows_code_not_comments(tmp_path):
  source = pathlib.Path(synthetic.__file__).read_text()
  assert synthetic.GENERATOR == synthetic.source_hash(synthetic.__file__)
  commented = tmp_path / "commented.py"
  commented.write_text(source.replace("\nCOLORS = {", "\n# a new comment\n\nCOLORS = {", 1))
  assert synthetic.source_hash(str(commented)) == synthetic.GENERATOR
  edited = tmp_path / "edited.py"
  edited.write_text(source.replace('"small": 0.085', '"small": 0.09', 1))
  assert edited.read_text() != source and synthetic.source_hash(str(edited)) != synthetic.GENERATOR


def test_an_edited_generator_never_reads_older_data(monkeypatch):
  """The synthetic data's directory and a run's fingerprint carry a hash of synthetic.py's code: data prepared
  by an earlier version of the generator (same arguments, other examples) are neither read back nor resumed."""
  from feddat_jax import config_utils, experiment
  repo = pathlib.Path(__file__).resolve().parents[1]
  name = synthetic_builder.synthetic_config("function", seed=1).name
  assert name == f"function-seed1-gen{synthetic.GENERATOR}"
  on_synthetic = config_utils.load_config(str(repo / "configs/vqa.py:runlocal=true"))
  on_real = config_utils.load_config(str(repo / "configs/vqa.py:runlocal=true,data=/d,backbone=hf:/c"))
  before = experiment.fingerprint(on_synthetic), experiment.fingerprint(on_real)
  monkeypatch.setattr(synthetic, "GENERATOR", "0123456789ab")
  assert synthetic_builder.synthetic_config("function", seed=1).name == "function-seed1-gen0123456789ab"
  assert experiment.fingerprint(on_synthetic) != before[0]
  assert experiment.fingerprint(on_real) == before[1]  # real data do not come from the generator
