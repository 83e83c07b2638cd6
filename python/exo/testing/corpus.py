"""The built-in text the synthetic tokenizers are trained on (written for this project)."""

# ruff: noqa: RUF001  (full-width punctuation is part of the multilingual text on purpose)

CORPUS = """
The cluster wakes before dawn. Each node announces itself on the local network, listens for its
neighbours, and measures how much memory it can lend to the model. A laptop on the kitchen table,
a desktop under the stairs and an old server in the garage agree, within a few seconds, on who
holds which layers. Nobody asked them to be fast; they are fast because nothing is wasted.

Tokens travel around the ring one at a time. The first node turns words into numbers, the middle
nodes turn numbers into better numbers, and the last node chooses the next word. When a node
disappears, the others notice, say so plainly, and carry on without it. A request never waits
forever for a peer that is gone.

Les machines parlent entre elles sans cérémonie. Le café est prêt, la fenêtre est ouverte, et le
modèle répond à la question suivante. Déjà vu? Peut-être. Où est passé le réseau? Il est là.

Die Knoten grüßen einander über das Netz. Größere Speicher übernehmen mehr Schichten; kleinere
Geräte helfen trotzdem mit. Über Nacht läuft alles weiter, ohne dass jemand zuschaut.

El sistema es sencillo: cada máquina guarda una parte del modelo y pasa el resultado a la
siguiente. ¿Funciona? Sí, y además es rápido. La señal llega, el niño sonríe, el año termina.

日本語の文章も少しだけ含めます。小さなモデルでも、文字は正しく扱わなければなりません。
今日は晴れです。明日もきっと良い天気でしょう。

中文也可以出现在这里。每个节点都负责模型的一部分，然后把结果交给下一个节点。

Emoji appear in chat all the time: 🙂 🚀 🌍 ✨ 🧠 — and a model must never cut one in half while
streaming. Numbers too: 0, 1, 2, 3, 42, 1024, 3.14159, 2026-11-24, 128256, 500000.

Code is text as well: def add(a, b): return a + b. for i in range(10): print(i). {"key": "value"}.
fn main() { println!("hello"); } SELECT name FROM nodes WHERE memory > 8192;

Questions and answers make up most conversations. Who are you? I am a small synthetic model. What
can you do? I can repeat patterns, count words and pretend to be wise. Why is the sky blue?
Because short wavelengths scatter more than long ones. Thank you! You are welcome.
"""
