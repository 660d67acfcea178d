"""Parsers for the real datasets' official annotation formats, one small function per format.

Each parser reads one split and returns *records*: schema examples whose images are still paths,
{question_id, image_paths, question, answers}; the builders check and encode the images. A missing or
malformed file raises a one-line `DataFormatError` naming the file and the format it should have.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Callable

Record = dict[str, Any]
Path = pathlib.Path

_JSON_NAMES = {dict: "a JSON object", list: "a JSON list", str: "a string", int: "an integer", float: "a number",
               bool: "a boolean", type(None): "null"}


class DataFormatError(ValueError):
  """A dataset directory, annotation file or image is missing or not in its official format."""


class _File:
  """One annotation file; its errors name the dataset, the path and the expected format."""

  def __init__(self, dataset: str, path: Path, expected: str):
    self.dataset, self.path, self.expected = dataset, Path(path), expected

  def error(self, problem: str) -> DataFormatError:
    return DataFormatError(f"{self.dataset}: {self.path}: {problem}; expected {self.expected}")

  def text(self) -> str:
    if not self.path.is_file():
      raise self.error("file not found")
    try:
      return self.path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
      raise self.error("not UTF-8 text") from None

  def json(self, kind: type) -> Any:
    try:
      data = json.loads(self.text())
    except json.JSONDecodeError as e:
      raise self.error(f"invalid JSON ({e.msg}, line {e.lineno})") from None
    return self.check(data, kind, "the file")

  def json_lines(self) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(self.text().splitlines(), 1):
      if line.strip():
        try:
          records.append(self.check(json.loads(line), dict, f"line {n}"))
        except json.JSONDecodeError as e:
          raise self.error(f"line {n}: invalid JSON ({e.msg})") from None
    return records

  def lines(self) -> list[str]:
    return self.text().splitlines()

  def check(self, value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind):
      raise self.error(f"{where} is {_JSON_NAMES.get(type(value), type(value).__name__)}, not {_JSON_NAMES[kind]}")
    return value

  def get(self, record: Any, key: str, where: str) -> Any:
    self.check(record, dict, where)
    if key not in record:
      raise self.error(f"{where} has no {key!r}")
    return record[key]


def _record(question_id: Any, image_paths: list[Path], question: str, answers: list[str]) -> Record:
  return dict(question_id=str(question_id), image_paths=image_paths, question=str(question),
              answers=[str(a) for a in answers])


def parse_vqa(dataset: str, questions_path: Path, annotations_path: Path,
              image_path: Callable[[int], Path]) -> list[Record]:
  """VQA v2 / VQA Abstract Scenes: questions JSON + annotations JSON (visualqa.org download page format).

  Questions {"questions": [{question_id, image_id, question}]}, annotations {"annotations": [{question_id,
  answers: [{answer, ...}] (10 annotators)}]}; `image_path(image_id)` applies the COCO file-name convention.
  """
  qf = _File(dataset, questions_path, 'a JSON object {"questions": [{question_id, image_id, question}, ...]}')
  af = _File(dataset, annotations_path,
             'a JSON object {"annotations": [{question_id, answers: [{answer}, ...]}, ...]}')
  annotations = af.check(af.get(af.json(dict), "annotations", "the file"), list, "'annotations'")
  answers = {}
  for i, a in enumerate(annotations):
    where = f"annotation {i}"
    answers[af.get(a, "question_id", where)] = [
        af.get(x, "answer", f"{where} answer") for x in af.check(af.get(a, "answers", where), list, where)]
  records = []
  for i, q in enumerate(qf.check(qf.get(qf.json(dict), "questions", "the file"), list, "'questions'")):
    where = f"question {i}"
    qid = qf.get(q, "question_id", where)
    if qid not in answers:
      raise af.error(f"no annotation for question_id {qid} of {questions_path.name}")
    image_id = qf.check(qf.get(q, "image_id", where), int, f"{where} 'image_id'")
    records.append(_record(qid, [image_path(image_id)], qf.get(q, "question", where), answers[qid]))
  return records


def parse_vizwiz(json_path: Path, image_dir: Path) -> list[Record]:
  """VizWiz-VQA: a JSON list of {image, question, answers: [{answer, answer_confidence}], ...}.

  One question per image, so the image file name (without extension) is the question id.
  """
  f = _File("vizwiz", json_path, "a JSON list of {image, question, answers: [{answer}, ...]}")
  records = []
  for i, r in enumerate(f.json(list)):
    where = f"record {i}"
    image = f.get(r, "image", where)
    answers = [f.get(a, "answer", f"{where} answer") for a in f.check(f.get(r, "answers", where), list, where)]
    records.append(_record(Path(image).stem, [image_dir / image], f.get(r, "question", where), answers))
  return records


def parse_gqa(json_path: Path, image_dir: Path) -> list[Record]:
  """GQA: a JSON object {question_id: {imageId, question, answer, fullAnswer, ...}}; images <imageId>.jpg."""
  f = _File("gqa", json_path, "a JSON object {question_id: {imageId, question, answer}, ...}")
  records = []
  for qid, r in f.json(dict).items():
    where = f"question {qid}"
    records.append(_record(qid, [image_dir / f"{f.get(r, 'imageId', where)}.jpg"], f.get(r, "question", where),
                           [f.get(r, "answer", where)]))
  return records


def parse_coco_qa(split_dir: Path, image_path: Callable[[int], Path]) -> list[Record]:
  """COCO-QA (Toronto): parallel text files questions.txt, answers.txt and img_ids.txt, one line per QA.

  types.txt (the question type) is not needed. Question ids are "<split>_<line index>".
  """
  files = {k: _File("coco_qa", split_dir / f"{k}.txt", "one line per question in questions.txt, answers.txt "
                    "and img_ids.txt (COCO image ids)") for k in ("questions", "answers", "img_ids")}
  lines = {k: f.lines() for k, f in files.items()}
  for k in ("answers", "img_ids"):
    if len(lines[k]) != len(lines["questions"]):
      raise files[k].error(f"{len(lines[k])} lines but questions.txt has {len(lines['questions'])}")
  records = []
  for i, (q, a, image_id) in enumerate(zip(lines["questions"], lines["answers"], lines["img_ids"])):
    if not image_id.strip().isdigit():
      raise files["img_ids"].error(f"line {i + 1} is {image_id!r}, not a COCO image id")
    records.append(_record(f"{split_dir.name}_{i}", [image_path(int(image_id))], q.strip(), [a.strip()]))
  return records


def parse_aqua(json_path: Path, image_dir: Path) -> list[Record]:
  """AQUA: a JSON list of {image, question, answer, need_external_knowledge}; images are SemArt's.

  Question ids are "<split>_<index>" (AQUA has none).
  """
  f = _File("aqua", json_path, "a JSON list of {image, question, answer, need_external_knowledge}")
  records = []
  for i, r in enumerate(f.json(list)):
    where = f"record {i}"
    records.append(_record(f"{json_path.stem}_{i}", [image_dir / f.get(r, "image", where)],
                           f.get(r, "question", where), [f.get(r, "answer", where)]))
  return records


def parse_clove(dataset: str, json_path: Path, image_path: Callable[[str], Path]) -> list[Record]:
  """CLOVE (CLVQA) json release: a JSON list of samples {question_id, image_id, question, answers, ...}.

  `answers` is the VQA-v2-style list of 10 (repeated when there is one answer); images are Visual Genome's
  <image_id>.jpg, found by `image_path(file name)` (Visual Genome unpacks into two folders).
  """
  f = _File(dataset, json_path, "a JSON list of {question_id, image_id, question, answers: [str, ...]}")
  records = []
  for i, r in enumerate(f.json(list)):
    where = f"record {i}"
    answers = f.check(f.get(r, "answers", where), list, f"{where} 'answers'")
    records.append(_record(f.get(r, "question_id", where), [image_path(f"{f.get(r, 'image_id', where)}.jpg")],
                           f.get(r, "question", where), answers))
  return records


def parse_nlvr2(jsonl_path: Path, image_dir: Path) -> list[Record]:
  """NLVR2: JSON lines {identifier, sentence, label: "True"|"False", directory (train only), ...}.

  The pair's images are <directory>/<identifier without its last "-n">-img0.png and -img1.png; the answer
  is the lower-cased label.
  """
  f = _File("nlvr2", jsonl_path, 'JSON lines {identifier, sentence, label: "True"|"False"}')
  records = []
  for n, r in enumerate(f.json_lines(), 1):
    where = f"line {n}"
    identifier = f.check(f.get(r, "identifier", where), str, f"{where} 'identifier'")
    label = f.get(r, "label", where)
    if label not in ("True", "False"):
      raise f.error(f"{where} has label {label!r}")
    folder = image_dir / str(r["directory"]) if "directory" in r else image_dir
    stem = identifier.rsplit("-", 1)[0]
    records.append(_record(identifier, [folder / f"{stem}-img0.png", folder / f"{stem}-img1.png"],
                           f.get(r, "sentence", where), [label.lower()]))
  return records


def parse_snli_ve(jsonl_path: Path, image_dir: Path) -> list[Record]:
  """SNLI-VE: JSON lines {pairID, Flikr30kID, sentence2, gold_label, ...}; the hypothesis is the question.

  Flikr30kID (sic) is the Flickr30k image file name.
  """
  f = _File("snli_ve", jsonl_path, "JSON lines {pairID, Flikr30kID, sentence2, gold_label}")
  records = []
  for n, r in enumerate(f.json_lines(), 1):
    where = f"line {n}"
    records.append(_record(f.get(r, "pairID", where), [image_dir / f.get(r, "Flikr30kID", where)],
                           f.get(r, "sentence2", where), [f.get(r, "gold_label", where)]))
  return records
