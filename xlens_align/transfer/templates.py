"""Small labelled text sets written in the repository (no downloads), for steering and probes.

* `sentiment()`: positive and negative words in fixed sentences (same sentence, one word
  swapped), for a steering vector and a sentiment probe;
* `topic()`: sentences about cooking (label 1) or about computers (label 0);
* `language()`: the same short sentences in French (label 1) and English (label 0);
* `STEER_PROMPTS` / `STEER_TARGETS`: prompts whose next token is a judgement (" good" vs " bad"),
  where a sentiment vector should move B's log-odds;
* `NEUTRAL`: plain sentences on which steering should leave next-token loss alone.

``labelled(name)`` returns ``(texts, labels)`` for any of the three sets (labels 1/0).
"""

from __future__ import annotations

__all__ = [
    "NEUTRAL",
    "SETS",
    "STEER_PROMPTS",
    "STEER_TARGETS",
    "labelled",
    "language",
    "sentiment",
    "topic",
]

POSITIVE = (
    "good great wonderful excellent lovely fantastic amazing delightful superb brilliant "
    "pleasant perfect beautiful charming"
).split()
NEGATIVE = (
    "bad terrible awful horrible dreadful poor disappointing boring miserable lousy "
    "unpleasant broken ugly annoying"
).split()
SENTENCES = (
    "The movie was {}.",
    "I thought the food was {}.",
    "Honestly, the service here is {}.",
    "My day at work was {}.",
    "The weather this weekend was {}.",
    "Her new book is {}.",
    "The hotel room was {}.",
    "Overall the concert was {}.",
    "This phone is {}.",
    "The whole trip was {}.",
    "The review said the play was {}.",
    "Our neighbours are {}.",
)

STEER_PROMPTS = (
    "I watched the film last night. In one word, it was",
    "We ate at the new restaurant. The meal was",
    "After the match, everyone agreed the game was",
    "I read the report this morning. The news was",
    "The teacher looked at my essay and said it was",
    "We stayed at that hotel for a week. The stay was",
    "My friend tried the new phone. She said it was",
    "The critics saw the play. They wrote that it was",
    "I listened to the album twice. It was",
    "We visited the museum on Sunday. The visit was",
    "The coffee at this place is really",
    "Looking back on the holiday, it was",
    "The interview went on for an hour. It was",
    "He tasted the soup and said it was",
    "The new software update is",
    "Their second concert was",
)
STEER_TARGETS = (" good", " bad")
"""(positive, negative) next tokens whose log-odds a sentiment vector should move."""

NEUTRAL = (
    "The train leaves the station at nine and arrives in the city before noon.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The library is open from Monday to Saturday, and closed on public holidays.",
    "To install the package, run the command below and restart the shell.",
    "The river runs through three countries before it reaches the sea.",
    "A triangle has three sides, and its angles add up to one hundred and eighty degrees.",
    "The meeting has been moved to Thursday afternoon in the second floor room.",
    "Most birds build their nests in spring, when food is easier to find.",
    "The function returns a list of the keys, sorted in ascending order.",
    "The museum holds paintings from the sixteenth and seventeenth centuries.",
    "Each chapter ends with a short summary and a few exercises.",
    "The bridge was built in 1890 and repaired after the flood of 1952.",
)

COOKING = (
    "Chop the onions finely and fry them in butter until golden.",
    "Bake the bread for forty minutes in a hot oven.",
    "Add a pinch of salt to the boiling pasta water.",
    "Whisk the eggs with sugar until the mixture is pale.",
    "Simmer the tomato sauce slowly for an hour.",
    "Season the soup with pepper and fresh herbs.",
    "Roast the chicken with garlic, lemon and thyme.",
    "Knead the dough and let it rise under a cloth.",
    "Slice the carrots and steam them for ten minutes.",
    "Stir the rice so that it does not stick to the pan.",
    "Grate the cheese over the warm vegetables.",
    "Marinate the fish in oil and lime juice overnight.",
    "Melt the chocolate gently over a pan of hot water.",
    "Peel the potatoes and boil them in salted water.",
    "Serve the salad with a simple vinegar dressing.",
    "Fold the cream into the batter with a spatula.",
)
COMPUTERS = (
    "Restart the server after installing the security update.",
    "The program crashed because the disk was full.",
    "Compile the code with optimisation turned on.",
    "The laptop has sixteen gigabytes of memory.",
    "Open a terminal and list the files in the folder.",
    "The database query returned too many rows.",
    "Plug the keyboard into a free USB port.",
    "The network card drops packets under heavy load.",
    "Back up your files before upgrading the system.",
    "The compiler warns about an unused variable.",
    "The processor runs hot when all cores are busy.",
    "Log in with your password and check the settings.",
    "The script reads a file and prints each line.",
    "Clear the browser cache if the page looks wrong.",
    "The printer is connected to the office network.",
    "The function raises an error when the input is empty.",
)
ENGLISH_FRENCH = (
    ("The cat is sleeping on the chair.", "Le chat dort sur la chaise."),
    ("I would like a cup of coffee.", "Je voudrais une tasse de café."),
    ("The weather is nice today.", "Il fait beau aujourd'hui."),
    ("Where is the train station?", "Où est la gare ?"),
    ("We are going to the beach tomorrow.", "Nous allons à la plage demain."),
    ("My brother works in a hospital.", "Mon frère travaille dans un hôpital."),
    ("The children are playing in the garden.", "Les enfants jouent dans le jardin."),
    ("She reads a book every week.", "Elle lit un livre chaque semaine."),
    ("The shop closes at seven.", "Le magasin ferme à sept heures."),
    ("I have lost my keys again.", "J'ai encore perdu mes clés."),
    ("The soup is too hot.", "La soupe est trop chaude."),
    ("We live near the river.", "Nous habitons près de la rivière."),
    ("He forgot his umbrella at home.", "Il a oublié son parapluie à la maison."),
    ("The film starts at eight.", "Le film commence à huit heures."),
    ("Can you open the window?", "Peux-tu ouvrir la fenêtre ?"),
    ("The bread is fresh this morning.", "Le pain est frais ce matin."),
)


def sentiment() -> tuple[list[str], list[str]]:
    """(positive texts, negative texts): every sentence with every word; the i-th positive text
    and the i-th negative text share their sentence."""
    pos = [s.format(w) for s in SENTENCES for w in POSITIVE]
    neg = [s.format(w) for s in SENTENCES for w in NEGATIVE]
    return pos, neg


def topic() -> tuple[list[str], list[str]]:
    """(cooking texts, computer texts)."""
    return list(COOKING), list(COMPUTERS)


def language() -> tuple[list[str], list[str]]:
    """(French texts, English texts): the same sentences, row by row."""
    return [f for _, f in ENGLISH_FRENCH], [e for e, _ in ENGLISH_FRENCH]


SETS = {"sentiment": sentiment, "topic": topic, "language": language}


def labelled(name: str) -> tuple[list[str], list[int]]:
    """``(texts, labels)`` of the set `name` ("sentiment", "topic" or "language"): label 1 for
    the first group (positive, cooking, French), 0 for the second."""
    if name not in SETS:
        raise ValueError(f"name must be one of {sorted(SETS)}, got {name!r}")
    one, zero = SETS[name]()
    return one + zero, [1] * len(one) + [0] * len(zero)
