"""The dataset scan against sd-scripts-behaviour.md §1 (folders, extensions, captions, reg balancing)."""

from __future__ import annotations

import pytest

from loracli.dataset.scan import parse_folder_name, scan_dataset
from loracli.errors import DatasetError


@pytest.mark.parametrize("name,expected", [
    ("10_sks dog", (10, "sks dog")), ("02_two_words here", (2, "two_words here")), ("3", (3, "")),
    (" 5_x", (5, "x")), ("abc_dog", None), (".ipynb_checkpoints", None), ("1e2_x", None),
    ("0_x", (0, "x")), ("-1_x", (-1, "x")),
])
def test_folder_names(name, expected):
    assert parse_folder_name(name) == expected


def images(folder, make_image, n, size=(64, 64), captions=True):
    for i in range(n):
        make_image(folder / f"{i:03d}.png", *size)
        if captions:
            (folder / f"{i:03d}.txt").write_text(f"cap {i}\nsecond line ignored\n")


def test_skipped_folders_and_files_with_reasons(tmp_path, make_image):
    data = tmp_path / "data"
    images(data / "2_ok", make_image, 2)
    images(data / "abc_dog", make_image, 1)
    images(data / "0_zero", make_image, 1)
    images(data / "2_ok" / "nested", make_image, 1)
    make_image(data / "loose.png", 64, 64)
    (data / "2_ok" / "anim.gif").write_bytes(b"GIF89a")
    scan = scan_dataset(data, None)
    reasons = {s.path.name: s.reason for s in scan.skipped}
    assert "prefix" in reasons["abc_dog"] and "repeats < 1" in reasons["0_zero"]
    assert "sub-folders" in reasons["nested"] and "sub-folders" in reasons["loose.png"]
    assert reasons["anim.gif"] == "unsupported extension"
    assert scan.num_train_images == 4 and len(scan.subsets) == 1


def test_extensions_case_insensitive_with_a_note(tmp_path, make_image):
    data = tmp_path / "data"
    make_image(data / "1_x" / "a.PNG", 64, 64)
    make_image(data / "1_x" / "b.Jpg", 64, 64)
    make_image(data / "1_x" / "c.jpeg", 64, 64)
    scan = scan_dataset(data, None)
    assert sorted(i.path.name for i in scan.subsets[0].images) == ["a.PNG", "b.Jpg", "c.jpeg"]
    assert any("b.Jpg" in n and "sd-scripts on Linux" in n for n in scan.notes)


def test_captions_first_line_class_tokens_and_face_crop(tmp_path, make_image):
    data = tmp_path / "data"
    images(data / "1_sks dog", make_image, 1)
    make_image(data / "1_sks dog" / "nocap.png", 64, 64)
    make_image(data / "1_sks dog" / "face_10_20_30_40.png", 64, 64)
    (data / "1_sks dog" / "face.txt").write_text("face caption\n")
    by_name = {i.path.name: i for i in scan_dataset(data, None).subsets[0].images}
    assert by_name["000.png"].caption == "cap 0" and by_name["000.png"].caption_source == "file"
    assert by_name["nocap.png"].caption == "sks dog" and by_name["nocap.png"].caption_source == "class_tokens"
    assert by_name["face_10_20_30_40.png"].caption == "face caption"


def test_caption_extension_and_other_extension_warning(tmp_path, make_image):
    data = tmp_path / "data"
    make_image(data / "1_x" / "a.png", 64, 64)
    (data / "1_x" / "a.caption").write_text("from caption file\n")
    scan = scan_dataset(data, None, "txt")
    assert scan.subsets[0].images[0].caption_source == "class_tokens"
    assert any(".caption" in w and "dataset.caption_extension" in w for w in scan.warnings)
    assert scan_dataset(data, None, "caption").subsets[0].images[0].caption == "from caption file"


def test_all_empty_captions_and_corrupt_images_reported_at_once(tmp_path, make_image):
    data = tmp_path / "data"
    images(data / "1_x", make_image, 3)
    (data / "1_x" / "000.txt").write_text("")
    (data / "1_x" / "001.txt").write_text("\n\n")
    (data / "1_x" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError) as exc:
        scan_dataset(data, None)
    wheres = sorted(p.where.rsplit("/", 1)[-1] for p in exc.value.problems)
    assert wheres == ["000.txt", "001.txt", "bad.png"]


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DatasetError, match="dataset.train_data_dir"):
        scan_dataset(tmp_path / "nope", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no usable images"):
        scan_dataset(tmp_path / "empty", None)


@pytest.mark.parametrize("train,reg_folder,reg_count,expected_repeats,raw", [
    (("1_subj", 200), "1_person", 50, [4] * 50, 50),
    (("1_subj", 200), "1_person", 300, [1] * 200, 300),
    (("1_subj", 30), "4_y", 7, [5, 5, 4, 4, 4, 4, 4], 28),
])
def test_reg_balancing_examples(tmp_path, make_image, train, reg_folder, reg_count, expected_repeats, raw):
    folder, count = train
    images(tmp_path / "data" / folder, make_image, count, size=(8, 8), captions=False)
    images(tmp_path / "reg" / reg_folder, make_image, reg_count, size=(8, 8), captions=False)
    scan = scan_dataset(tmp_path / "data", tmp_path / "reg")
    reg = [s for s in scan.subsets if s.is_reg]
    repeats = [i.repeats for s in reg for i in s.images]
    assert repeats == expected_repeats
    assert scan.num_reg_images == raw
    assert sum(repeats) >= scan.num_train_images
    if reg_count == 300:
        assert any("not used" in w for w in scan.warnings)


def test_tag_frequency_once_per_image(tmp_path, make_image):
    data = tmp_path / "data"
    make_image(data / "5_x" / "a.png", 64, 64)
    make_image(data / "5_x" / "b.png", 64, 64)
    (data / "5_x" / "a.txt").write_text("Red, blue ,red\n")
    (data / "5_x" / "b.txt").write_text("red\n")
    assert scan_dataset(data, None).tag_frequency == {"5_x": {"red": 3, "blue": 1}}
