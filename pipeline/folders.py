"""Data sets on disk without TensorFlow: which folders are classes, which files are images, VOC and COCO layouts.

Each rule is written once, here. `pipeline.checks` applies them cheaply before TensorFlow is imported
(one listing of the class folders, stopping at each class's first image; the VOC / COCO folders and
list files), so a missing class or an empty one is reported in about a second; the dataset classes
(`pipeline.data.ImageFolder`, `pipeline.segmentation.VOCSegmentation`, `COCOSegmentation`) apply the
same functions when they read the data, so the early check and the run can never disagree.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

from pipeline.files import as_list

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """Raises a ValueError naming `key` and its choices when `value` is not one of them."""
    if value not in choices:
        names = [repr(choice) for choice in choices]
        raise ValueError(f"{key} must be {', '.join(names[:-1])} or {names[-1]}; got {value!r}.")


def image_extensions(extensions) -> tuple[str, ...]:
    """Lower-case extensions with their dot: `.JPG` and `jpg` both mean `.jpg`; one string is one extension."""
    return tuple(extension.lower() if extension.startswith(".") else f".{extension.lower()}"
                 for extension in as_list(extensions))


def check_folder_options(validation_percent: float, test_percent: float, on_bad_image: str,
                         on_duplicate: str) -> None:
    """The option values `pipeline.data.ImageFolder` takes, checked before any file is read.

    Args:
        validation_percent, test_percent: shares of the validation and test splits.
        on_bad_image: "skip" or "error".
        on_duplicate: "warn", "drop" or "error".

    Raises:
        ValueError: naming the option and what it allows.
    """
    check_choice("on_bad_image", on_bad_image, ("skip", "error"))
    if not 0 <= validation_percent + test_percent < 100:
        raise ValueError(
            "validation_percent + test_percent must be in [0, 100) so training keeps images; "
            f"got {validation_percent} + {test_percent}."
        )
    check_choice("on_duplicate", on_duplicate, ("warn", "drop", "error"))


def missing_root_error(root: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Dataset root {root} does not exist or is not a folder. Set dataset.root to a folder "
        "with one sub-folder of images per class (see datasets/README.md)."
    )


def class_folders(root: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[str]:
    """The class names: the sorted names of `root`'s sub-folders (links to folders count, hidden ones do not).

    Args:
        root: the data root.
        extensions: lower-case image extensions, to say so when the images lie in `root` itself.

    Raises:
        FileNotFoundError: `root` is not a folder.
        ValueError: fewer than two class folders, with what `root` holds instead.
    """
    if not os.path.isdir(root):
        raise missing_root_error(root)
    entries = [entry for entry in os.scandir(root) if not entry.name.startswith(".")]
    names = sorted(entry.name for entry in entries if _is_folder(entry))
    if len(names) >= 2:
        return names
    loose = sum(os.path.splitext(entry.name)[1].lower() in extensions for entry in entries if not _is_folder(entry))
    found = f"only 1 class folder ({names[0]})" if names else "no class folders"
    if loose:
        found += f" and {loose} image file(s) directly in it"
    raise ValueError(
        f"Dataset root {root} has {found}; a classifier needs at least two. Put each class's images in its "
        f"own sub-folder: {os.path.join(root, '<class name>', 'image.jpg')}."
    )


def image_files(root: str, class_name: str, extensions: tuple[str, ...],
                left_out: dict[str, int] | None = None, warn: bool = True) -> Iterator[str]:
    """The images of one class, as paths relative to `root`, in a fixed order (lazily: stop at the first).

    Sub-folders are searched too and links to folders followed, never into a loop; hidden files and
    folders are ignored, and so are files of other extensions (counted by extension in `left_out`).

    Args:
        root: the data root.
        class_name: a class folder under it.
        extensions: lower-case extensions to take.
        left_out: extension -> count of the files left out, added to.
        warn: log a link back to a folder being searched (the listing that reads the data does).
    """
    for directory, names in _walk_following_links(os.path.join(root, class_name), warn):
        for name in names:
            extension = os.path.splitext(name)[1].lower()
            if extension in extensions:
                yield os.path.relpath(os.path.join(directory, name), root)
            elif left_out is not None:
                left_out[extension or "(none)"] = left_out.get(extension or "(none)", 0) + 1


def no_images_error(root: str, class_name: str, extensions: tuple[str, ...], left_out: dict[str, int]) -> ValueError:
    others = ", ".join(f"{count} {extension}" for extension, count in sorted(left_out.items()))
    holds = f" (it holds {others}, left out by dataset.extensions)" if others else ""
    return ValueError(
        f"Class folder {os.path.join(root, class_name)} has no images with extensions {', '.join(extensions)}"
        f"{holds}. Add images or remove the folder."
    )


def check_image_folder(root: str, extensions=IMAGE_EXTENSIONS, validation_percent: float = 10,
                       test_percent: float = 10, on_bad_image: str = "skip", on_duplicate: str = "warn",
                       **_ignored) -> None:
    """The checks of `pipeline.data.ImageFolder` that need no image opened: cheap, run before TensorFlow.

    Lists the class folders and, in each, stops at its first image. Takes the dataset config's keys.

    Args:
        root, extensions, validation_percent, test_percent, on_bad_image, on_duplicate: as ImageFolder's.

    Raises:
        FileNotFoundError: no such root.
        ValueError: an option out of its range, fewer than two classes, a class folder without images.
    """
    check_folder_options(validation_percent, test_percent, on_bad_image, on_duplicate)
    root = str(Path(root).expanduser().resolve())
    extensions = image_extensions(extensions)
    for class_name in class_folders(root, extensions):
        left_out: dict[str, int] = {}
        if next(image_files(root, class_name, extensions, left_out, warn=False), None) is None:
            raise no_images_error(root, class_name, extensions, left_out)


def scan_folder(root: str, extensions: tuple[str, ...]) -> tuple[list[str], list[tuple[int, str]]]:
    """Class names (sorted sub-folder names) and every (label, relative path with `/`), sorted.

    The rules of `class_folders` and `image_files`; files of other extensions are left out, and the
    log says how many of each extension.

    Args:
        root: the data root.
        extensions: lower-case extensions to take.
    """
    class_names = class_folders(root, extensions)
    files, left_out = [], {}
    for label, class_name in enumerate(class_names):
        class_left_out: dict[str, int] = {}
        found = sorted(image_files(root, class_name, extensions, class_left_out))
        if not found:
            raise no_images_error(root, class_name, extensions, class_left_out)
        files += [(label, path.replace(os.sep, "/")) for path in found]
        for extension, count in class_left_out.items():
            left_out[extension] = left_out.get(extension, 0) + count
    if left_out:
        counts = ", ".join(f"{count} {extension}" for extension, count in sorted(left_out.items()))
        log.warning("%s: %d file(s) left out by extension (%s); dataset.extensions takes %s. Add an "
                    "extension there to use those files.", root, sum(left_out.values()), counts,
                    ", ".join(extensions))
    return class_names, files


def _is_folder(entry: os.DirEntry) -> bool:
    """A folder or a link to one; a link loop or a broken link is a file (reported as unreadable later)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _walk_following_links(top: str, warn: bool = True):
    """(folder, file names) under `top`, sorted, following folder links but never into a loop."""
    stack = [(top, frozenset({os.path.realpath(top)}))]
    while stack:
        directory, ancestors = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            if warn:
                log.warning("Cannot list %s: %s; its files are left out.", directory, error.strerror or error)
            continue
        names, folders = [], []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if _is_folder(entry):  # a link to a folder included
                real = os.path.realpath(entry.path)
                if real in ancestors:
                    if warn:
                        log.warning("Skipping %s: a symbolic link back to %s, which holds it (a loop).",
                                    entry.path, real)
                    continue
                folders.append((entry.path, ancestors | {real}))
            else:
                names.append(entry.name)
        yield directory, names
        stack.extend(reversed(folders))


# --- PASCAL VOC (+ SBD) and COCO: the folders and files a data set needs before anything is read -------


def not_voc_error(root: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{root} is not a PASCAL VOC folder: it has no JPEGImages/. Set dataset.root to "
        "the folder holding JPEGImages/, SegmentationClass/ and ImageSets/ (e.g. "
        ".../VOCdevkit/VOC2012), or use dataset=voc_demo for the offline demo."
    )


def voc_list_path(root: Path, sbd_root: Path | None, source: str) -> tuple[str, Path]:
    """("voc" or "sbd", the id list file) of a split source "voc/<name>" or "sbd/<name>", which must exist.

    Args:
        root: the VOC folder (holds ImageSets/Segmentation/).
        sbd_root: SBD's `dataset` folder, or None.
        source: "voc/<name>" (ImageSets/Segmentation/<name>.txt) or "sbd/<name>" (<sbd_root>/<name>.txt).

    Raises:
        ValueError: a malformed source, or an SBD list without dataset.sbd_root.
        FileNotFoundError: the list file does not exist.
    """
    kind, _, name = str(source).partition("/")
    if kind == "voc":
        path = root / "ImageSets" / "Segmentation" / f"{name}.txt"
    elif kind == "sbd":
        if sbd_root is None:
            raise ValueError(f"Split list {source!r} needs dataset.sbd_root: the SBD `dataset` folder.")
        if not sbd_root.is_dir():
            raise FileNotFoundError(f"dataset.sbd_root={sbd_root} (for {source!r}) does not exist or is not a "
                                    "folder: set it to SBD's benchmark_RELEASE/dataset folder (img/, cls/, train.txt).")
        path = sbd_root / f"{name}.txt"
    else:
        raise ValueError(f"Split lists are 'voc/<name>' or 'sbd/<name>'; got {source!r}.")
    if not path.is_file():
        hint = (" seg11valid.txt (the reference's 736 validation ids) comes with the FCN reference "
                "code (data/pascal/seg11valid.txt); copy it there.") if name == "seg11valid" else (
                " Check dataset.root (or dataset.sbd_root) and dataset.splits.")
        raise FileNotFoundError(f"Image list {path} for {source!r} does not exist.{hint}")
    return kind, path


def check_voc_layout(root: str, splits: dict[str, list[str]] | None = None, sbd_root: str | None = None,
                     on_bad_image: str = "skip", **_ignored) -> None:
    """VOC's folders and every split's id list exist (and SBD's, for "sbd/..." lists); nothing is opened.

    Args:
        root, splits, sbd_root, on_bad_image: as `pipeline.segmentation.VOCSegmentation`'s.

    Raises:
        FileNotFoundError: no JPEGImages/ under root, or a list file missing.
        ValueError: a malformed split source or option.
    """
    check_choice("on_bad_image", on_bad_image, ("skip", "error"))
    root = Path(root).expanduser().resolve()
    if not (root / "JPEGImages").is_dir():
        raise not_voc_error(root)
    sbd = Path(sbd_root).expanduser().resolve() if sbd_root else None
    sources = [source for listed in (splits or {}).values() for source in as_list(listed)]
    for source in sources:
        voc_list_path(root, sbd, source)
    if any(str(source).startswith("voc/") for source in sources) and not (root / "SegmentationClass").is_dir():
        raise FileNotFoundError(
            f"{root} has no SegmentationClass/, the folder of VOC's class masks (<id>.png) that the voc/... "
            "lists need. Download the VOC trainval set (the test set has no masks), or use only sbd/... lists."
        )


def check_coco_layout(root: str, splits: dict[str, dict[str, str]], on_bad_image: str = "skip",
                      **_ignored) -> None:
    """COCO's annotation files and image folders exist, and pycocotools is installed; nothing is opened.

    Args:
        root, splits, on_bad_image: as `pipeline.segmentation.COCOSegmentation`'s.

    Raises:
        ImportError: no pycocotools.
        FileNotFoundError: an annotation file or an image folder missing.
        ValueError: a split without its `images` and `annotations` keys, or a bad option.
    """
    check_choice("on_bad_image", on_bad_image, ("skip", "error"))
    if importlib.util.find_spec("pycocotools") is None:
        raise ImportError("dataset=coco reads annotations with pycocotools: pip install pycocotools")
    root = Path(root).expanduser().resolve()
    for split_name, spec in splits.items():
        if not isinstance(spec, Mapping) or not {"images", "annotations"} <= set(spec):
            raise ValueError(f"dataset.splits.{split_name} must name its image folder and annotation file: "
                             "{images: val2017, annotations: annotations/instances_val2017.json}.")
        annotations = root / spec["annotations"]
        if not annotations.is_file():
            raise FileNotFoundError(f"COCO annotation file {annotations} ({split_name}) does not exist. "
                                    "Set dataset.root to the folder holding annotations/.")
        if not (root / spec["images"]).is_dir():
            raise FileNotFoundError(f"COCO image folder {root / spec['images']} ({split_name}) does not exist. "
                                    f"Set dataset.root, or dataset.splits.{split_name}.images to the image folder.")
