"""Which characters are glyph classes, and which script (alphabet) each belongs to.

A class is one Unicode letter or decimal digit that stands on its own:

- general category ``Lu``, ``Ll``, ``Lt``, ``Lo`` or ``Nd``; modifier letters (``Lm``)
  and combining marks are left out, they are not drawn alone;
- it has no decomposition (its NFKD form is itself). Compatibility characters
  (fullwidth forms, ligatures such as ``ﬁ``, mathematical alphanumerics, superscripts,
  the Kelvin sign, CJK compatibility ideographs, halfwidth kana) are styled copies of
  another class. Letters with diacritics (``À``, ``Ё``, ``ἶ``, ``が``) are their base
  letter plus marks: once cropped and scaled to fit 26 px, ``Ĩ Ï Ī Ĭ`` differ in a
  handful of pixels, and ``Ë`` is ``Ё``, a look-alike across scripts. Both kinds are
  left out; Hangul syllables, which decompose into jamo by algorithm, stay;
- Hangul conjoining jamo are left out (they are parts of syllable blocks).

The script comes from the character's Unicode name (``LATIN CAPITAL LETTER A`` ->
Latin), as the longest known script prefix of the name. The standard library has no
Script property; the name prefix gives the same answer for every letter kept here,
without a data file. ASCII digits form the script ``Digits``.
"""

from __future__ import annotations

import unicodedata

__all__ = ["UNICODE_VERSION", "class_label", "is_class_character", "script_of"]

UNICODE_VERSION = unicodedata.unidata_version

# Name prefixes of Unicode scripts (the words before LETTER, SYLLABLE, DIGIT, ...).
_SCRIPT_PREFIXES = frozenset(
    """
    ADLAM AHOM ARABIC ARMENIAN AVESTAN BALINESE BAMUM BATAK BENGALI BHAIKSUKI BOPOMOFO
    BRAHMI BUGINESE BUHID CARIAN CHAKMA CHAM CHEROKEE CHORASMIAN COPTIC CUNEIFORM CYPRIOT
    CYRILLIC DESERET DOGRA DUPLOYAN ELBASAN ELYMAIC ETHIOPIC GEORGIAN GLAGOLITIC GOTHIC
    GRANTHA GREEK GUJARATI GURMUKHI HANGUL HANUNOO HATRAN HEBREW HENTAIGANA HIRAGANA
    JAVANESE KAITHI KANNADA KATAKANA KHAROSHTHI KHITAN KHMER KHOJKI KHUDAWADI LAO LATIN
    LEPCHA LIMBU LISU LYCIAN LYDIAN MAHAJANI MAKASAR MALAYALAM MANDAIC MANICHAEAN MARCHEN
    MEDEFAIDRIN MIAO MODI MONGOLIAN MRO MULTANI MYANMAR NABATAEAN NANDINAGARI NEWA NKO
    NUSHU OGHAM OSAGE OSMANYA PALMYRENE PHOENICIAN REJANG RUNIC SAMARITAN SAURASHTRA
    SHARADA SHAVIAN SIDDHAM SINHALA SOGDIAN SOYOMBO SUNDANESE SYRIAC TAGALOG TAGBANWA
    TAKRI TAMIL TANGSA TELUGU THAANA THAI TIBETAN TIFINAGH TIRHUTA TOTO UGARITIC VAI
    VITHKUQI WANCHO WARANG_CITI YEZIDI YI
    """.replace("_", " ").split()
) | frozenset(
    {
        "BASSA VAH",
        "CANADIAN",
        "CAUCASIAN ALBANIAN",
        "CJK COMPATIBILITY",
        "CJK UNIFIED",
        "CYPRO-MINOAN",
        "DIVES AKURU",
        "GUNJALA GONDI",
        "HANIFI ROHINGYA",
        "IMPERIAL ARAMAIC",
        "INSCRIPTIONAL PAHLAVI",
        "INSCRIPTIONAL PARTHIAN",
        "KAYAH LI",
        "LINEAR A",
        "LINEAR B",
        "MASARAM GONDI",
        "MEETEI MAYEK",
        "MENDE KIKAKUI",
        "MEROITIC CURSIVE",
        "MEROITIC HIEROGLYPHIC",
        "NEW TAI LUE",
        "NYIAKENG PUACHUE HMONG",
        "OL CHIKI",
        "OLD HUNGARIAN",
        "OLD ITALIC",
        "OLD NORTH ARABIAN",
        "OLD PERMIC",
        "OLD PERSIAN",
        "OLD SOGDIAN",
        "OLD SOUTH ARABIAN",
        "OLD TURKIC",
        "OLD UYGHUR",
        "PAHAWH HMONG",
        "PAU CIN HAU",
        "PHAGS-PA",
        "PSALTER PAHLAVI",
        "SORA SOMPENG",
        "SYLOTI NAGRI",
        "TAI LE",
        "TAI THAM",
        "TAI VIET",
        "WARANG CITI",
        "ZANABAZAR SQUARE",
        # Digits and letter variants whose name starts with another word.
        "ARABIC-INDIC",
        "EXTENDED ARABIC-INDIC",
    }
)

# Prefixes that name a script differently from their title case.
_SCRIPT_NAMES = {
    "CJK UNIFIED": "Han",
    "CJK COMPATIBILITY": "Han",
    "CANADIAN": "Canadian Syllabics",
    "ARABIC-INDIC": "Arabic",
    "EXTENDED ARABIC-INDIC": "Arabic",
    "NKO": "NKo",
    "PHAGS-PA": "Phags-pa",
}

_CATEGORIES = frozenset({"Lu", "Ll", "Lt", "Lo", "Nd"})
_JAMO_WORDS = frozenset({"CHOSEONG", "JUNGSEONG", "JONGSEONG"})
_LONGEST_PREFIX = max(len(p.split()) for p in _SCRIPT_PREFIXES)


def script_of(char: str) -> str | None:
    """Return the script (alphabet) of a single character, or None when it has none.

    Examples: ``A`` -> ``Latin``, ``Ж`` -> ``Cyrillic``, ``永`` -> ``Han``,
    ``7`` -> ``Digits``, ``٣`` -> ``Arabic``.
    """
    name = unicodedata.name(char, "")
    if not name:
        return None
    words = name.split()
    if words[0] == "DIGIT":
        return "Digits"
    for n in range(min(len(words), _LONGEST_PREFIX), 0, -1):
        prefix = " ".join(words[:n])
        if prefix in _SCRIPT_PREFIXES:
            return _SCRIPT_NAMES.get(prefix, prefix.title())
    return None


def is_class_character(char: str) -> bool:
    """Tell whether a character may be a glyph class (see the module docstring)."""
    if unicodedata.category(char) not in _CATEGORIES:
        return False
    name = unicodedata.name(char, "")
    # Hangul syllables decompose into jamo by algorithm, not by added marks.
    if unicodedata.normalize("NFKD", char) != char and not name.startswith("HANGUL SYLLABLE"):
        return False
    if _JAMO_WORDS.intersection(name.split()):
        return False
    return script_of(char) is not None


def class_label(codepoint: int) -> str:
    """Return the name of a glyph class: ``"U+0416 Ж"`` (unique, readable)."""
    return f"U+{codepoint:04X} {chr(codepoint)}"
