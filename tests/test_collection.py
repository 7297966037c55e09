"""caption-batch's list files: relative paths from the list's folder, URIs kept as URIs (read through pyarrow)."""

from __future__ import annotations

import cv2
import numpy as np

from edgecap.scale.collection import expand, read_image


def test_list_file_lines_with_a_scheme_stay_uris(tmp_path):
    image = tmp_path / "photos" / "b.png"
    image.parent.mkdir()
    cv2.imwrite(str(image), np.full((20, 30, 3), (0, 0, 255), np.uint8))
    listing = tmp_path / "lists" / "todo.txt"
    listing.parent.mkdir()
    listing.write_text(f"# a comment\na.jpg\ns3://bucket/key/x.jpg\n\nfile://{image}\n")
    assert expand(str(listing)) == [str(listing.parent / "a.jpg"), "s3://bucket/key/x.jpg", f"file://{image}"]
    assert read_image(f"file://{image}")[0, 0].tolist() == [255, 0, 0]  # through pyarrow's local file system
