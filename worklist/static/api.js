// The one way the pages change a study's read state: the JSON API with the session's CSRF
// token (from the page's <meta name="csrf-token">). Resolves to the Response.
(function (global) {
  "use strict";
  global.setReadState = function (uid, state) {
    const token = document.querySelector('meta[name="csrf-token"]');
    return fetch("/api/studies/" + encodeURIComponent(uid) + "/read-state", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": token ? token.content : "" },
      body: JSON.stringify({ state: state }),
    });
  };
})(window);
