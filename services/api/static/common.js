// Shared by every page: the key field, and `authed(url, opts)`, which fetches with the key.
// Each script of the dashboard is a function scope of its own: the locked page writes the
// real one over itself, and a second top-level `const` in the same window would be an error.
(() => {
  const KEY = 'mates-api-key';
  const keyInput = document.getElementById('api-key');
  keyInput.value = sessionStorage.getItem(KEY) || '';
  for (const ev of ['input', 'change']) {
    keyInput.addEventListener(ev, () => sessionStorage.setItem(KEY, keyInput.value.trim()));
  }
  function authed(url, opts = {}) {
    const k = sessionStorage.getItem(KEY);
    const headers = Object.assign({}, opts.headers || {}, k ? {Authorization: 'Bearer ' + k} : {});
    return fetch(url, Object.assign({}, opts, {headers, cache: 'no-store'}));
  }
  function problem(status, body) {
    const d = body && body.detail;
    return 'HTTP ' + status + ': ' + (typeof d === 'string' ? d : JSON.stringify(d || body));
  }
  const refreshMs = Number(document.body.dataset.refreshMs || 3000);
  window.mates = {KEY, keyInput, authed, problem, refreshMs};
})();
