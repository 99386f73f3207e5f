// The locked page: ask for the key, keep it in this tab, fetch the real page with it.
(() => {
  const {KEY, keyInput, authed} = window.mates;
  const msg = document.getElementById('locked-msg');
  async function unlock() {
    if (!sessionStorage.getItem(KEY)) return;
    const r = await authed(location.href);
    if (r.ok) { const page = await r.text(); document.open(); document.write(page); document.close(); }
    else { msg.textContent = r.status === 403 ? 'that key was refused' : 'HTTP ' + r.status; }
  }
  document.getElementById('unlock').addEventListener('submit', (ev) => {
    ev.preventDefault(); sessionStorage.setItem(KEY, keyInput.value.trim()); unlock();
  });
  unlock();
})();
