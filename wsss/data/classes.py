"""Class-name lists (background first) and reading a user's `classes.txt`."""

from __future__ import annotations

from pathlib import Path

from wsss.errors import DataError

# PASCAL VOC 2012: index 0 is background, 1..20 the object classes in the devkit's order.
VOC_CLASSES: list[str] = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]

# COCO 2014: the 80 official "thing" categories in ascending category-id order; the ids have gaps,
# so class k (1..80) is COCO_CATEGORY_IDS[k - 1].
COCO_CLASSES: list[str] = [
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]
COCO_CATEGORY_IDS: list[int] = [
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83), *range(84, 91),
]

# Names accepted for class 0 at the top of a user's classes.txt (labelme writes "_background_").
BACKGROUND_NAMES = ("background", "_background_", "__background__", "bg")

MAX_CLASSES = 255  # index PNGs are uint8 and 255 means "ignore", so C <= 255


def read_class_list(path: str | Path) -> list[str]:
    """Read `classes.txt`: one name per line, background first; blank lines and `#` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "class list not found")
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate the BOM some editors write
    except UnicodeDecodeError:
        raise DataError(path, "class list is not UTF-8 text") from None
    names = [line.strip() for line in text.splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    return check_class_names(names, path)


def check_class_names(names: list[str], source: str | Path | None) -> list[str]:
    """Validate a class list (background first, unique, fits a uint8 index PNG); return it."""
    if len(names) < 2:
        raise DataError(source, f"class list needs background plus at least one class, got {names}")
    if names[0].lower() not in BACKGROUND_NAMES:
        raise DataError(source, f"first class must be the background (index 0), got {names[0]!r}; "
                                "add a line 'background' at the top")
    if len(names) > MAX_CLASSES:
        raise DataError(source, f"{len(names)} classes; at most {MAX_CLASSES} fit an index PNG (255 = ignore)")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if ";" in n:
            raise DataError(source, f"class name {n!r} contains ';', the separator of label files")
        key = n.lower()
        if key in seen:
            raise DataError(source, f"class {n!r} is listed twice (entries {seen[key]} and {i})")
        seen[key] = i
    return list(names)


def __getattr__(name: str) -> dict[str, list[str]]:
    """`CLASS_LISTS`: {"voc12", "coco14", "shapes"} -> class names; built on first use (shapes imports cv2)."""
    if name == "CLASS_LISTS":
        from wsss.data.shapes import CLASS_NAMES as SHAPES_CLASSES

        lists = {"voc12": VOC_CLASSES, "coco14": COCO_CLASSES, "shapes": list(SHAPES_CLASSES)}
        globals()["CLASS_LISTS"] = lists
        return lists
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
