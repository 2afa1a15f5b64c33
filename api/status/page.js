// Replaces the page's content with a fresh copy every 5 s, without a
// reload; a failed refresh marks the page stale and tries again.
(function () {
  "use strict";
  var body = document.body;
  var refreshes = 0;
  body.classList.add("js");
  function refresh() {
    fetch(location.pathname, { headers: { Accept: "text/html" }, cache: "no-store" })
      .then(function (r) {
        if (!r.ok) { throw new Error("status " + r.status); }
        return r.text();
      })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("status");
        var current = document.getElementById("status");
        if (!fresh || !current) { throw new Error("no status in the answer"); }
        current.replaceWith(document.importNode(fresh, true));
        refreshes++;
        body.dataset.refreshes = String(refreshes);
        body.classList.remove("stale");
      })
      .catch(function () { body.classList.add("stale"); })
      .finally(function () { setTimeout(refresh, 5000); });
  }
  setTimeout(refresh, 5000);
})();
