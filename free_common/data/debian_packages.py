"""Debian packages the data sets are built from, per size, and what is installed.

Two sizes:

``small``
    A handful of small font packages (Latin, Greek, Cyrillic, Hebrew, Armenian,
    Georgian, Lao, Coptic through DejaVu and FreeFont), about 12 MB, plus the data
    packages: ``dataset-fashion-mnist`` and ``python3-confusable-homoglyphs``
    (Unicode's confusables). Builds in seconds; the tests and the demo use it.
``benchmark``
    "Tier A" of the project's data survey: every ``fonts-*`` package of Debian bookworm
    whose download is at most 5 MB, plus ``fonts-noto-core`` (about 260 MB in all),
    without the two metapackages that would pull larger packages in
    (``fonts-recommended``, ``fonts-yozvox-yozfont``), plus the two data packages.

One more set is no data: ``browser`` (Debian's ``chromium`` and ``chromium-driver``),
the headless browser the console's tests drive; `make install` adds it with the
development tools, never to the docker images.

Run ``python -m free_common.data.debian_packages --missing small|benchmark|browser ...``
to print the space-separated names not installed yet (nothing when all are); the
Makefile feeds that to ``apt-get install``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from free_common.errors import DataError, FontPackageMissing

__all__ = [
    "BENCHMARK_PACKAGES",
    "BROWSER_PACKAGES",
    "CHROMEDRIVER",
    "CHROMIUM",
    "CONFUSABLES_PACKAGE",
    "DATASET_PACKAGES",
    "FASHION_MNIST_PACKAGE",
    "PACKAGE_SETS",
    "SMALL_PACKAGES",
    "font_packages",
    "install_hint",
    "main",
    "missing_packages",
    "package_licence",
    "package_versions",
    "require_installed",
]

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
# Unicode's confusables.txt as JSON; the glyph builder reads that data file only.
CONFUSABLES_PACKAGE = "python3-confusable-homoglyphs"
DATASET_PACKAGES: tuple[str, ...] = (CONFUSABLES_PACKAGE, FASHION_MNIST_PACKAGE)

SMALL_PACKAGES: tuple[str, ...] = (
    "fonts-cantarell",
    "fonts-croscore",
    "fonts-crosextra-caladea",
    "fonts-crosextra-carlito",
    "fonts-dejavu-core",
    "fonts-dejavu-extra",
    "fonts-freefont-ttf",
    "fonts-liberation",
    "fonts-linuxlibertine",
    "fonts-open-sans",
    "fonts-paratype",
    *DATASET_PACKAGES,
)

# Generated from the bookworm package index (download size <= 5,000,000 bytes) and
# frozen here, so that a build names the same fonts wherever it runs.
_TIER_A_FONTS = """
fonts-3270 fonts-adf-accanthis fonts-adf-baskervald fonts-adf-berenis fonts-adf-gillius
fonts-adf-ikarius fonts-adf-irianis fonts-adf-libris fonts-adf-mekanus fonts-adf-oldania
fonts-adf-romande fonts-adf-solothurn fonts-adf-switzera fonts-adf-tribun
fonts-adf-universalis fonts-adf-verana fonts-agave fonts-aksharyogini2 fonts-alee
fonts-allerta fonts-amiga fonts-anonymous-pro fonts-aoyagi-kouzan-t fonts-aoyagi-soseki
fonts-apropal fonts-arabeyes fonts-arapey fonts-arkpandora fonts-arphic-bkai00mp
fonts-arphic-bsmi00lp fonts-arphic-gbsn00lp fonts-arphic-gkai00mp fonts-arundina
fonts-atarismall fonts-averia-gwf fonts-averia-sans-gwf fonts-averia-serif-gwf
fonts-b612 fonts-babelstone-modern fonts-bajaderka fonts-bebas-neue fonts-beng
fonts-beng-extra fonts-beteckna fonts-blankenburg fonts-bpg-georgian fonts-breip
fonts-bwht fonts-cabin fonts-cabinsketch fonts-campania fonts-cantarell fonts-cardo
fonts-cegui fonts-century-catalogue fonts-cherrybomb fonts-circos-symbols
fonts-clear-sans fonts-cmu fonts-comfortaa fonts-comic-neue fonts-courier-prime
fonts-creep2 fonts-croscore fonts-crosextra-caladea fonts-crosextra-carlito
fonts-cwtex-docs fonts-cwtex-heib fonts-cwtex-yen fonts-dancingscript fonts-dclfonts
fonts-ddc-uchen fonts-dejavu fonts-dejavu-core fonts-dejavu-extra fonts-dejima-mincho
fonts-denemo fonts-deva fonts-deva-extra fonts-dkg-handwriting fonts-dosis
fonts-droid-fallback fonts-dseg fonts-dustin fonts-dzongkha fonts-ebgaramond
fonts-ebgaramond-extra fonts-ecolier-court fonts-ecolier-lignes-court fonts-eeyek
fonts-elstob fonts-elusive-icons fonts-engadget fonts-entypo fonts-essays1743
fonts-eurofurence fonts-evertype-conakry fonts-f500 fonts-fantasma fonts-fantasque-sans
fonts-fanwood fonts-farsiweb fonts-femkeklaver fonts-ferrite-core fonts-firacode
fonts-font-awesome fonts-fork-awesome fonts-freefarsi fonts-freefont-otf
fonts-freefont-ttf fonts-gamaliel fonts-gargi fonts-gemunu-libre fonts-georgewilliams
fonts-gfs-artemisia fonts-gfs-baskerville fonts-gfs-bodoni-classic fonts-gfs-complutum
fonts-gfs-didot fonts-gfs-didot-classic fonts-gfs-gazis fonts-gfs-neohellenic
fonts-gfs-olga fonts-gfs-porson fonts-gfs-solomos fonts-gfs-theokritos fonts-glasstty
fonts-glyphicons-halflings fonts-gnutypewriter fonts-go fonts-gotico-antiqua
fonts-goudybookletter fonts-gubbi fonts-gujr fonts-gujr-extra fonts-guru
fonts-guru-extra fonts-hack fonts-hack-otf fonts-hack-ttf fonts-hack-web fonts-havana
fonts-hermit fonts-hosny-amiri fonts-hosny-thabit fonts-humor-sans fonts-inconsolata
fonts-indic fonts-inter fonts-inter-variable fonts-ipaexfont fonts-ipaexfont-gothic
fonts-ipaexfont-mincho fonts-ipafont fonts-ipafont-gothic fonts-ipafont-mincho
fonts-isabella fonts-jetbrains-mono fonts-johnsmith-induni fonts-joscelyn fonts-jsmath
fonts-junction fonts-jura fonts-kacst fonts-kacst-one fonts-kalapi fonts-karla
fonts-karmilla fonts-katex fonts-kaushanscript fonts-khmeros fonts-klaudia-berenika
fonts-knda fonts-komatuna fonts-konatu fonts-kristi fonts-lao fonts-lato fonts-ldco
fonts-le-murmure fonts-league-mono fonts-league-spartan fonts-leckerli-one
fonts-lemonada fonts-levien-museum fonts-levien-typoscript fonts-lexi-gulim
fonts-lexi-saebom fonts-lg-aboriginal fonts-liberation fonts-liberation2 fonts-libfinal
fonts-lindenhill fonts-linex fonts-linuxlibertine fonts-lklug-sinhala fonts-lmodern
fonts-lobster fonts-lobstertwo fonts-lohit-beng-assamese fonts-lohit-beng-bengali
fonts-lohit-deva fonts-lohit-deva-marathi fonts-lohit-deva-nepali fonts-lohit-gujr
fonts-lohit-guru fonts-lohit-knda fonts-lohit-mlym fonts-lohit-orya fonts-lohit-taml
fonts-lohit-taml-classical fonts-lohit-telu fonts-lxgw-wenkai-doc fonts-lyx
fonts-manchufont fonts-manrope fonts-material-design-icons-iconfont
fonts-materialdesignicons-webfont fonts-mathjax fonts-mathjax-extras fonts-meera-inimai
fonts-meera-taml fonts-misaki fonts-mlym fonts-mmcedar fonts-mona fonts-monapo
fonts-monlam fonts-monofur fonts-monoid fonts-monoid-halfloose fonts-monoid-halftight
fonts-monoid-loose fonts-monoid-tight fonts-mononoki fonts-morisawa-bizud-mincho
fonts-motoya-l-cedar fonts-motoya-l-maruberi fonts-mph-2b-damase fonts-myanmar
fonts-nafees fonts-nakula fonts-nanum-coding fonts-national-park fonts-naver-d2coding
fonts-navilu fonts-noto fonts-noto-core fonts-noto-hinted fonts-noto-mono
fonts-noto-ui-core fonts-noto-unhinted fonts-ocr-a fonts-ocr-b fonts-oflb-asana-math
fonts-oflb-euterpe fonts-okolaks fonts-oldstandard fonts-open-sans fonts-opendin
fonts-opendyslexic fonts-opensymbol fonts-orya fonts-orya-extra fonts-osifont
fonts-oxygen fonts-pagul fonts-paktype fonts-paratype fonts-pc fonts-pc-extra fonts-play
fonts-povray fonts-powerline fonts-prociono fonts-proggy fonts-quattrocento
fonts-quicksand fonts-radisnoir fonts-ricty-diminished fonts-rit-sundar fonts-roadgeek
fonts-roboto fonts-roboto-fontface fonts-roboto-hinted fonts-roboto-slab
fonts-roboto-unhinted fonts-routed-gothic fonts-rufscript fonts-sahadeva
fonts-sambhota-tsugring fonts-sambhota-yigchung fonts-samyak fonts-samyak-deva
fonts-samyak-gujr fonts-samyak-mlym fonts-samyak-orya fonts-samyak-taml fonts-sarai
fonts-sawarabi-gothic fonts-sawarabi-mincho fonts-senamirmir-washra fonts-sil-abyssinica
fonts-sil-akatab fonts-sil-alkalami fonts-sil-andika fonts-sil-andika-compact
fonts-sil-andikanewbasic fonts-sil-annapurna fonts-sil-awami-nastaliq fonts-sil-charis
fonts-sil-charis-compact fonts-sil-dai-banna fonts-sil-doulos fonts-sil-doulos-compact
fonts-sil-ezra fonts-sil-galatia fonts-sil-gentium fonts-sil-gentium-basic
fonts-sil-gentiumplus-compact fonts-sil-harmattan fonts-sil-lateef fonts-sil-mingzat
fonts-sil-mondulkiri fonts-sil-mondulkiri-extra fonts-sil-nuosusil fonts-sil-padauk
fonts-sil-scheherazade fonts-sil-shimenkan fonts-sil-shimenkan-gsm
fonts-sil-shimenkan-guifan fonts-sil-shimenkan-mas fonts-sil-shimenkan-mgs
fonts-sil-shimenkan-salaowu fonts-sil-shimenkan-sapushan fonts-sil-shimenkan-taogu
fonts-sil-shimenkan-zonghe fonts-sil-sophia-nubian fonts-sil-tagmukay
fonts-sil-taiheritagepro fonts-sil-zaghawa-beria fonts-sipa-arundina fonts-sixtyfour
fonts-sjfonts fonts-smc fonts-smc-anjalioldlipi fonts-smc-chilanka fonts-smc-dyuthi
fonts-smc-gayathri fonts-smc-karumbi fonts-smc-keraleeyam fonts-smc-manjari
fonts-smc-meera fonts-smc-rachana fonts-smc-raghumalayalamsans fonts-smc-suruma
fonts-smc-uroob fonts-smiley-sans fonts-sora fonts-spleen fonts-staypuft fonts-stix
fonts-summersby fonts-symbola fonts-tagbanwa fonts-takao fonts-takao-gothic
fonts-takao-mincho fonts-taml fonts-taml-tamu fonts-taml-tscu fonts-telu
fonts-telu-extra fonts-teluguvijayam fonts-terminus fonts-terminus-otb
fonts-texgyre-math fonts-thai-tlwg fonts-thai-tlwg-otf fonts-thai-tlwg-ttf
fonts-thai-tlwg-web fonts-tibetan-machine fonts-tiresias fonts-tlwg-garuda
fonts-tlwg-garuda-otf fonts-tlwg-garuda-ttf fonts-tlwg-kinnari fonts-tlwg-kinnari-otf
fonts-tlwg-kinnari-ttf fonts-tlwg-laksaman fonts-tlwg-laksaman-otf
fonts-tlwg-laksaman-ttf fonts-tlwg-loma fonts-tlwg-loma-otf fonts-tlwg-loma-ttf
fonts-tlwg-mono fonts-tlwg-mono-otf fonts-tlwg-mono-ttf fonts-tlwg-norasi
fonts-tlwg-norasi-otf fonts-tlwg-norasi-ttf fonts-tlwg-purisa fonts-tlwg-purisa-otf
fonts-tlwg-purisa-ttf fonts-tlwg-sawasdee fonts-tlwg-sawasdee-otf
fonts-tlwg-sawasdee-ttf fonts-tlwg-typewriter fonts-tlwg-typewriter-otf
fonts-tlwg-typewriter-ttf fonts-tlwg-typist fonts-tlwg-typist-otf fonts-tlwg-typist-ttf
fonts-tlwg-typo fonts-tlwg-typo-otf fonts-tlwg-typo-ttf fonts-tlwg-umpush
fonts-tlwg-umpush-otf fonts-tlwg-umpush-ttf fonts-tlwg-waree fonts-tlwg-waree-otf
fonts-tlwg-waree-ttf fonts-tomsontalks fonts-triod-postnaja fonts-tuffy
fonts-ubuntu-title fonts-umeplus fonts-umeplus-cl fonts-unifont fonts-unikurdweb
fonts-uniol fonts-uralic fonts-vlgothic fonts-vollkorn fonts-wine fonts-wqy-microhei
fonts-yanone-kaffeesatz fonts-yrsa-rasa
"""

BENCHMARK_PACKAGES: tuple[str, ...] = (*_TIER_A_FONTS.split(), *DATASET_PACKAGES)

PACKAGE_SETS: dict[str, tuple[str, ...]] = {
    "small": SMALL_PACKAGES,
    "benchmark": BENCHMARK_PACKAGES,
}

# The console's browser tests drive Debian's own Chromium through its own driver, so no
# tool ever downloads a browser (Selenium Manager is never asked: the path is given).
BROWSER_PACKAGES: tuple[str, ...] = ("chromium", "chromium-driver")
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

_DOC_ROOT = Path("/usr/share/doc")
_LICENCE_LINE = re.compile(r"^License:\s*(\S.*?)\s*$", re.MULTILINE)
# Copyright files that are not machine-readable: the first phrase found names the licence.
_LICENCE_PHRASES = (
    ("SIL Open Font License", "OFL-1.1"),
    ("Open Font License", "OFL"),
    ("GNU General Public License", "GPL"),
    ("GNU Lesser General Public License", "LGPL"),
    ("Apache License", "Apache-2.0"),
    ("LaTeX Project Public License", "LPPL"),
    ("IPA Font License", "IPA"),
    ("Arphic Public License", "Arphic-1999"),
    ("Bitstream Vera", "Bitstream-Vera"),
    ("public domain", "public-domain"),
)


def font_packages(names: Iterable[str]) -> tuple[str, ...]:
    """Return the font packages among `names` (the data set packages left out), sorted."""
    return tuple(sorted(n for n in set(names) if n not in DATASET_PACKAGES))


def missing_packages(names: Iterable[str]) -> tuple[str, ...]:
    """Return the packages among `names` that dpkg does not list as installed, sorted.

    Raises
    ------
    DataError
        When ``dpkg-query`` is not there (not a Debian-based system).
    """
    if shutil.which("dpkg-query") is None:
        raise DataError(
            "dpkg-query not found: the glyph benchmark and Fashion-MNIST come from Debian "
            "packages; run on Debian or Ubuntu (or in the project's Docker image)"
        )
    installed = package_versions(names)
    return tuple(n for n in sorted(set(names)) if n not in installed)


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """Return the installed version of each package in `names` (absent ones left out)."""
    wanted = sorted(set(names))
    dpkg_query = shutil.which("dpkg-query")
    if not wanted or dpkg_query is None:
        return {}
    listed = subprocess.run(
        [dpkg_query, "-W", "-f=${Package}\t${db:Status-Status}\t${Version}\n", *wanted],
        capture_output=True,
        text=True,
        check=False,
    ).stdout  # unknown names make dpkg-query exit 1: they are simply not installed
    versions = {}
    for line in listed.splitlines():
        name, _, rest = line.partition("\t")
        status, _, version = rest.partition("\t")
        if status == "installed":
            versions[name] = version
    return versions


def install_hint(missing: Sequence[str], size: str | None = None) -> str:
    """Return the command that installs `missing`, short enough for one error line."""
    if size is not None and len(missing) > 6:
        return (
            "apt-get install -y --no-install-recommends "
            f"$(python -m free_common.data.debian_packages --missing {size})"
        )
    return "apt-get install -y --no-install-recommends " + " ".join(missing)


def require_installed(names: Iterable[str], size: str | None = None) -> None:
    """Raise `FontPackageMissing` unless every package in `names` is installed.

    Parameters
    ----------
    names
        Debian package names.
    size
        The package set's name (``small``, ``benchmark``), used to shorten the hint.
    """
    missing = missing_packages(names)
    if not missing:
        return
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    also = " (or `make install` for the small set)" if size in (None, "small") else ""
    raise FontPackageMissing(
        f"Debian packages not installed: {shown}; run: {install_hint(missing, size)}{also}"
    )


def package_licence(name: str, doc_root: Path = _DOC_ROOT) -> str:
    """Return a short licence name for an installed package from its copyright file.

    The first ``License:`` field of a machine-readable copyright file wins; older
    free-form files are searched for a known licence phrase.
    """
    path = doc_root / name / "copyright"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"unknown (no {path})"
    found = _LICENCE_LINE.search(text)
    # Some free-form files start a sentence with "License:"; a short field is a name.
    if found and len(found.group(1).split()) <= 6:
        return found.group(1)
    lowered = text.lower()
    for phrase, short in _LICENCE_PHRASES:
        if phrase.lower() in lowered:
            return short
    return f"see {path}"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the missing packages of the given sets, space-separated (nothing when all are)."""
    parser = argparse.ArgumentParser(
        prog="python -m free_common.data.debian_packages",
        description="Print the Debian packages of package sets that are not installed.",
    )
    sets = {**PACKAGE_SETS, "browser": BROWSER_PACKAGES}
    parser.add_argument("--missing", choices=sorted(sets), nargs="+", required=True)
    args = parser.parse_args(argv)
    try:
        missing = missing_packages([name for key in args.missing for name in sets[key]])
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if missing:
        print(" ".join(missing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
