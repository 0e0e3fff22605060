"""Invented names: unique, pronounceable words built from syllables, never real place names.

Every name and alias handed out is claimed (case-insensitively), so no two entities share a name
or an alias and an answer string always points at one entity.
"""

from __future__ import annotations

import random

# Non-initial syllables always take an onset, so vowels never pile up ("aoe").
ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
          "br", "dr", "gr", "kr", "tr", "st", "th", "sh", "vr", "zh")
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou", "ae")
CODAS = ("", "", "n", "r", "l", "s", "th", "nd", "rk", "m", "x")

# Short syllable words can spell real names ("Mali", "Lima", "Oslo"); these are refused. Only
# single words matter: the generator never produces a space inside a base name.
REAL_NAMES = frozenset("""
afghanistan albania algeria andorra angola argentina armenia australia austria azerbaijan bahamas
bahrain bangladesh barbados belarus belgium belize benin bhutan bolivia bosnia botswana brazil brunei
bulgaria burkina burundi cambodia cameroon canada chad chile china colombia comoros congo croatia cuba
cyprus czechia denmark djibouti dominica ecuador egypt eritrea estonia eswatini ethiopia fiji finland
france gabon gambia georgia germany ghana greece grenada guatemala guinea guyana haiti honduras hungary
iceland india indonesia iran iraq ireland israel italy jamaica japan jordan kazakhstan kenya kiribati
korea kosovo kuwait kyrgyzstan laos latvia lebanon lesotho liberia libya liechtenstein lithuania
luxembourg madagascar malawi malaysia maldives mali malta mauritania mauritius mexico micronesia moldova
monaco mongolia montenegro morocco mozambique myanmar namibia nauru nepal netherlands nicaragua niger
nigeria norway oman pakistan palau panama paraguay peru philippines poland portugal qatar romania russia
rwanda samoa senegal serbia seychelles singapore slovakia slovenia somalia spain sudan suriname sweden
switzerland syria taiwan tajikistan tanzania thailand togo tonga tunisia turkey turkmenistan tuvalu
uganda ukraine uruguay uzbekistan vanuatu venezuela vietnam yemen zambia zimbabwe persia prussia
bavaria burma ceylon zaire tibet
kabul tirana algiers luanda yerevan canberra vienna baku manama dhaka minsk brussels belmopan thimphu
sarajevo gaborone brasilia sofia bujumbura phnom yaounde ottawa santiago beijing bogota moroni havana
nicosia prague copenhagen quito cairo asmara tallinn addis suva helsinki paris libreville tbilisi berlin
accra athens conakry bissau georgetown budapest reykjavik delhi jakarta tehran baghdad dublin jerusalem
rome kingston tokyo amman astana nairobi tarawa seoul pristina bishkek vientiane riga beirut maseru
monrovia tripoli vaduz vilnius antananarivo lilongwe bamako valletta nouakchott chisinau ulaanbaatar
podgorica rabat maputo windhoek kathmandu amsterdam managua niamey abuja pyongyang skopje oslo muscat
islamabad ngerulmud lima manila warsaw lisbon doha bucharest moscow kigali apia dakar belgrade victoria
freetown bratislava ljubljana honiara mogadishu pretoria madrid khartoum paramaribo stockholm bern
damascus taipei dushanbe dodoma bangkok dili tunis ankara ashgabat funafuti kampala kyiv kiev london
washington montevideo tashkent caracas hanoi sanaa lusaka harare bangui brazzaville kinshasa malabo
lome mbabane juba gitega naypyidaw lagos karachi istanbul mumbai shanghai dubai sydney melbourne toronto
montreal chicago boston houston dallas miami denver seattle atlanta detroit phoenix hamburg munich
cologne frankfurt milan naples turin venice florence genoa barcelona valencia seville porto marseille
lyon nice toulouse bordeaux lille geneva zurich basel krakow gdansk odessa kazan samara osaka kyoto
nagoya kobe busan mecca medina cusco lhasa kolkata chennai pune dhaka agra lahore tabriz shiraz mosul
aleppo izmir sparta troy carthage babylon memphis thebes luxor aswan giza nara sendai hue perth
darwin hobart dunedin cork galway leeds york bath oxford cambridge dover ely derry tokyo salem
nile amazon yangtze mekong volga danube rhine thames seine loire elbe oder vistula ganges indus
tigris euphrates congo zambezi niger orinoco yukon mississippi missouri ohio hudson jordan tiber
rhone ebro tagus douro dnieper don ural ob lena amur irtysh yenisei murray
anna maria elena sara laura lisa nina mira vera olga irene helen rosa clara lena lara tara dora
mona nora luna gina dina rita tina maya ella emma ava mia zara adam david daniel samuel simon
peter paul mark martin tom ben sam max leo hugo oscar felix victor boris ivan igor omar ali hassan
karim yusuf tariq zaid amir sami noor jose juan luis carlos mario marco diego pedro rafael sofia
""".split())


class NameForge:
    """Hands out invented words and keeps a register of every name and alias already in use."""

    def __init__(self, rng: random.Random):
        self._rng = rng
        self._taken: set[str] = set(REAL_NAMES)

    def claim(self, name: str) -> bool:
        """Reserve `name` (case-insensitively); False if it is already someone's name or alias."""
        key = name.casefold()
        if key in self._taken:
            return False
        self._taken.add(key)
        return True

    def word(self, endings: tuple[str, ...] = CODAS, syllables: tuple[int, int] = (2, 3)) -> str:
        """A new capitalised word with `syllables` syllables and one of `endings` appended."""
        rng = self._rng
        while True:
            count = rng.randint(*syllables)
            parts = [rng.choice(("",) + ONSETS) + rng.choice(VOWELS)]
            parts += [rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(count - 1)]
            ending = rng.choice(endings)
            # An ending that starts with a vowel replaces the last vowel ("Tarno" + "ia" -> "Tarnia").
            if ending and ending[0] in "aeiou":
                parts[-1] = parts[-1].rstrip("aeiou")
            word = ("".join(parts) + ending).capitalize()
            if 4 <= len(word) <= 12 and self.claim(word):
                return word


def acronym(name: str) -> str:
    """Initials of the capitalised words: "Korvath Museum of Art" -> "KMA"."""
    return "".join(w[0] for w in name.split() if w[0].isupper())


def demonym(base: str) -> str:
    """Adjective for a nation's people and language: Velora -> Veloran, Tarnia -> Tarnian."""
    if base.endswith("a"):
        return base + "n"
    if base.endswith(("e", "i", "o", "u")):
        return base[:-1] + "ian"
    return base + "ian"
