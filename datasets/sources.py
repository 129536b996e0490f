"""The catalogue of ``bench download``: where each dataset comes from, its licence, its
published checksum and what its archive holds.

URLs and checksums are the publishers' links as anomalib's ``DownloadInfo`` entries record them
(open-edge-platform/anomalib, ``src/anomalib/data/datamodules/``: image/mvtecad.py,
image/mvtecad2.py, depth/mvtec_3d.py, image/visa.py, image/btech.py and
``datasets/image/mvtec_loco.py``); licences are the publishers' (their pages and READMEs).
A :class:`Source` is a plain dataclass: build one to fetch from a mirror or a test server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CC_BY_NC_SA = ("CC BY-NC-SA 4.0", "https://creativecommons.org/licenses/by-nc-sa/4.0/")
CC_BY = ("CC BY 4.0", "https://creativecommons.org/licenses/by/4.0/")
ANOMALIB = "anomalib: open-edge-platform/anomalib, src/anomalib/data/"

MVTEC_LAYOUT = """<root>/<category>/train/good/<id>.png
  <root>/<category>/test/<defect or good>/<id>.png
  <root>/<category>/ground_truth/<defect>/<id>_mask.png"""
POINTS_LAYOUT = """<root>/<category>/train/<id>.pcd
  <root>/<category>/test/<id>_<defect or good>.pcd
  <root>/<category>/gt/<id>_<defect>.txt  (or GT/; lines 'x y z label')"""


@dataclass(frozen=True)
class Source:
    """Where one dataset comes from and how its archive maps onto the loader's root."""

    name: str  #: the ``bench download`` name (``DatasetSpec.download``)
    title: str
    licence: str
    licence_url: str
    homepage: str  #: the publisher's page
    url: str | None  #: the archive's direct link; None: the dataset is fetched by hand
    sha256: str | None = None  #: the published SHA-256 (None: none is published)
    md5: str | None = None  #: a published MD5, verified where no SHA-256 is published
    checksum_source: str = ""  #: where the published sum was read
    #: the folder inside the archive that becomes the root (None: the archive's top level; a
    #: single folder wrapping everything is descended into either way)
    top: str | None = None
    dataset: str | None = None  #: the registered dataset whose loader checks the layout
    version: str = ""  #: the release, as the publisher names or dates it
    #: unpacked size / archive size (an estimate, kept on the safe side) for the disk-space check
    unpack_factor: float = 1.2
    size: int | None = None  #: archive bytes, used when the server sends no Content-Length
    layout: str = ""  #: the expected layout, shown with manual instructions
    manual: str = ""  #: steps to fetch it by hand (datasets without a direct link)
    note: str = ""  #: what the archive holds, what was assumed, what is not verified

    def __post_init__(self) -> None:
        for algo, value, n in (("sha256", self.sha256, 64), ("md5", self.md5, 32)):
            if value is not None and not re.fullmatch(f"[0-9a-f]{{{n}}}", value):
                raise ValueError(f"{self.name}: {algo} must be {n} lowercase hex digits: {value!r}")

    @property
    def loader(self) -> str:
        """The registered dataset name whose ``categories(root)`` checks the unpacked data."""
        return self.dataset or self.name


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            "mvtec_ad",
            "MVTec AD",
            *CC_BY_NC_SA,
            homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
            url="https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/"
            "download/420938113-1629960298/mvtec_anomaly_detection.tar.xz",
            sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
            checksum_source=ANOMALIB + "datamodules/image/mvtecad.py",
            version="2019",
            note="tar.xz; the 15 category folders (bottle ... zipper), license.txt and "
            "readme.txt at its top level",
        ),
        Source(
            "mvtec_3d",
            "MVTec 3D-AD",
            *CC_BY_NC_SA,
            homepage="https://www.mvtec.com/company/research/datasets/mvtec-3d-ad",
            url="https://www.mydrive.ch/shares/150646/25de33f1276dd418cd856f2f48a84cdb/"
            "download/428824485-1643299897/mvtec_3d_anomaly_detection.tar.xz",
            md5="d8bb2800fbf3ac88e798da6ae10dc819",
            checksum_source=ANOMALIB + "datamodules/depth/mvtec_3d.py (its 'hashsum' is an "
            "MD5: 32 hex digits, where anomalib checks SHA-256)",
            version="2021",
            unpack_factor=1.5,  # an estimate: xz packs the float32 point grids tightly
            note="tar.xz; the 10 category folders (bagel ... tire) at its top level. No SHA-256 "
            "is published: the published MD5 is verified and the SHA-256 computed is recorded",
        ),
        Source(
            "mvtec_loco",
            "MVTec LOCO AD",
            *CC_BY_NC_SA,
            homepage="https://www.mvtec.com/company/research/datasets/mvtec-loco",
            url="https://www.mydrive.ch/shares/48237/1b9106ccdfbb09a0c414bd49fe44a14a/"
            "download/430647091-1646842701/mvtec_loco_anomaly_detection.tar.xz",
            sha256="9e7c84dba550fd2e59d8e9e231c929c45ba737b6b6a6d3814100f54d63aae687",
            checksum_source=ANOMALIB + "datasets/image/mvtec_loco.py",
            version="2022",
            note="tar.xz; the 5 category folders (breakfast_box ... splicing_connectors) at "
            "its top level",
        ),
        Source(
            "mvtec_ad2",
            "MVTec AD 2",
            *CC_BY_NC_SA,
            homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad-2",
            url="https://www.mydrive.ch/shares/150997/701c90d3aea6588f404936e32a674602/"
            "download/466712769-1743429042/mvtec_ad_2.tar.gz",
            sha256="c0ded99ef32bfc8e352d52beb44515e5b292b8598cb963aadfa91ca0763505e4",
            checksum_source=ANOMALIB + "datamodules/image/mvtecad2.py",
            version="2025",
            unpack_factor=1.05,  # gzip of PNG files
            note="tar.gz; the 8 category folders (can ... walnuts) at its top level",
        ),
        Source(
            "visa",
            "VisA (Visual Anomaly)",
            *CC_BY,
            homepage="https://github.com/amazon-science/spot-diff",
            url="https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
            sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
            checksum_source=ANOMALIB + "datamodules/image/visa.py",
            version="20220922",
            unpack_factor=1.05,  # an uncompressed tar
            note="plain tar; the 12 object folders (candle ... pipe_fryum) and split_csv/ at "
            "its top level (the release as published: no train/test folders). Licence: the "
            "publisher's README says CC BY 4.0 (anomalib's docstring says CC BY-NC-SA 4.0)",
        ),
        Source(
            "btad",
            "BTAD (beanTech Anomaly Detection)",
            *CC_BY_NC_SA,
            homepage="https://avires.dimi.uniud.it/papers/btad/",
            url="https://avires.dimi.uniud.it/papers/btad/btad.zip",
            sha256="461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
            checksum_source=ANOMALIB + "datamodules/image/btech.py",
            top="BTech_Dataset_transformed",
            version="2021",
            unpack_factor=1.1,
            note="zip; one folder BTech_Dataset_transformed/ holding 01/, 02/, 03/ (anomalib "
            "renames it to the root, as this does). Licence as anomalib states it; the "
            "publisher's page names none that this catalogue could read",
        ),
        Source(
            "mpdd",
            "MPDD (Metal Parts Defect Detection)",
            *CC_BY_NC_SA,
            homepage="https://github.com/stepanje/MPDD",
            url=None,
            layout=MVTEC_LAYOUT,
            manual="1. open the publisher's OneDrive folder: https://vutbr-my.sharepoint.com/:f:/"
            "g/personal/xjezek16_vutbr_cz/EhHS_ufVigxDo3MC6Lweau0BVMuoCmhMZj6ddamiQ7-FnA?e=oHKCxI\n"
            "2. download the whole folder (OneDrive packs it as one zip)\n"
            "3. unpack it and move the folder holding bracket_black/, bracket_brown/, "
            "bracket_white/, connector/, metal_plate/ and tubes/ to {root}",
            note="no direct link (a OneDrive folder); no checksum is published. Licence as "
            "anomalib states it; the publisher's README names none",
        ),
        Source(
            "real3d_ad",
            "Real3D-AD",
            *CC_BY,
            homepage="https://github.com/M-3LAB/Real3D-AD",
            url=None,
            layout=POINTS_LAYOUT,
            manual="1. download real3d-ad-pcd.zip from Google Drive: https://drive.google.com/"
            "file/d/1oM4qjhlIMsQc_wiFIFIVBvuuR8nyk2k0/view?usp=sharing\n"
            "   (or Baidu: https://pan.baidu.com/s/1orQY3DjR6Z0wazMNPysShQ, code vrmi)\n"
            "2. unzip it and move the folder holding airplane/, candybar/, car/, ... (12 "
            "categories, each with train/, test/ and gt/) to {root}",
            note="no direct link (cloud drives); no checksum is published",
        ),
        Source(
            "anomaly_shapenet",
            "Anomaly-ShapeNet",
            *CC_BY,
            homepage="https://github.com/Chopper-233/Anomaly-ShapeNet",
            url=None,
            layout=POINTS_LAYOUT,
            manual="1. download Anomaly-ShapeNet-v2.zip from Baidu: "
            "https://pan.baidu.com/s/1Nm50WIU_jx5viozwe59HsQ?pwd=case (code case)\n"
            "2. unzip it and move its dataset/pcd folder (ashtray0/, bag0/, ... each with "
            "train/, test/ and GT/) to {root}",
            note="no direct link (a Baidu disk); no checksum is published",
        ),
    )
}


def get_source(name: str) -> Source:
    """The catalogue entry ``name``; an unknown name is an error listing the known ones."""
    from bench.errors import ConfigError

    if name not in SOURCES:
        import difflib

        close = difflib.get_close_matches(name, list(SOURCES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"bench download knows no dataset {name!r}{hint}; known: {', '.join(SOURCES)}"
        )
    return SOURCES[name]
