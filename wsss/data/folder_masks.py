"""A minimal data set over a folder of ground-truth PNGs, for scoring outputs against any GT folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from wsss.data.base import SegDataset
from wsss.errors import DataError


class MaskFolder(SegDataset):
    """`<dir>/<id>.png` ground-truth masks; no images (sizes come from the masks)."""

    def __init__(self, directory: Path, class_names: list[str]):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise DataError(self.dir, "ground-truth folder not found")
        super().__init__(sorted(p.stem for p in self.dir.glob("*.png")), class_names, source=self.dir)

    def image_path(self, sample_id: str) -> Path:
        return self.mask_path(sample_id)

    def mask_path(self, sample_id: str) -> Optional[Path]:
        return self.dir / f"{sample_id}.png"
