// The runs table's body is fetched again as the server renders it (escaping in one place).
(() => {
  const {authed, refreshMs} = window.mates;
  async function refreshRuns() {
    try {
      const r = await authed('/dashboard/rows');
      if (r.ok) {
        document.getElementById('runs-body').innerHTML = await r.text();
        document.getElementById('refreshed').textContent = new Date().toLocaleTimeString();
      }
    } catch (e) { /* the API is restarting: try again next time */ }
  }
  setInterval(refreshRuns, refreshMs);
})();
