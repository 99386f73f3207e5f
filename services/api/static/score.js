// The score form: POST /v1/score with the key, the scores shown as text (never as markup).
(() => {
  const {authed, problem} = window.mates;
  document.getElementById('score-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const out = document.getElementById('score-out'), err = document.getElementById('score-error');
    out.replaceChildren(); err.textContent = '';
    document.getElementById('score-version').textContent = '';
    const raw = document.getElementById('score-docs').value.trim();
    let docs;
    if (raw.startsWith('[')) {
      try { docs = JSON.parse(raw); } catch (e) { err.textContent = 'not valid JSON: ' + e.message; return; }
      docs = docs.map((d, i) => typeof d === 'string' ? {id: 'doc-' + (i + 1), text: d} : d);
    } else {
      docs = raw.split('\n').map(s => s.trim()).filter(s => s)
                .map((text, i) => ({id: 'doc-' + (i + 1), text}));
    }
    if (!docs.length) { err.textContent = 'enter at least one document'; return; }
    const model = document.getElementById('score-model').value.trim();
    let r, body;
    try {
      r = await authed('/v1/score', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                     body: JSON.stringify({model, documents: docs})});
      body = await r.json().catch(() => null);
    } catch (e) { err.textContent = 'the API cannot be reached: ' + e.message; return; }
    if (!r.ok) { err.textContent = problem(r.status, body); return; }
    const version = r.headers.get('X-Model-Version') || model;
    document.getElementById('score-version').textContent =
      'scored by ' + version + ' (influence-model output in z-units; lower is more helpful)';
    const head = document.createElement('tr');
    for (const h of ['id', 'score', 'document']) {
      const th = document.createElement('th'); th.textContent = h; th.className = h === 'document' ? 'doc' : '';
      head.append(th);
    }
    out.append(head);
    const texts = new Map(docs.map(d => [d.id, d.text]));
    for (const s of body) {
      const tr = document.createElement('tr'); tr.className = 'score-row';
      const id = document.createElement('td'); id.textContent = s.id;
      const sc = document.createElement('td'); sc.textContent = s.score.toFixed(4); sc.dataset.score = s.score;
      const doc = document.createElement('td'); doc.className = 'doc'; doc.textContent = texts.get(s.id) || '';
      tr.append(id, sc, doc); out.append(tr);
    }
  });
})();
