// An unfinished run's section is swapped for a fresh one until the run ends; the score
// form below it keeps what was typed.
(() => {
  const {authed, refreshMs} = window.mates;
  async function refreshRun() {
    const section = document.getElementById('run');
    if (['done', 'failed', 'cancelled'].includes(section.dataset.status)) return;
    try {
      const r = await authed(location.href);
      if (r.ok) {
        const fresh = new DOMParser().parseFromString(await r.text(), 'text/html').getElementById('run');
        if (fresh) { section.replaceWith(fresh); }
      }
    } catch (e) { /* try again next time */ }
    setTimeout(refreshRun, refreshMs);
  }
  setTimeout(refreshRun, refreshMs);
})();
