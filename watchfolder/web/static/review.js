// To review: `a` approves and `r` rejects the focused entry (a retoucher reviews hundreds an
// hour, hands on the keyboard). After an action the page comes back at #review and the first
// entry waiting takes the focus; a live update keeps the focus on the entry that had it.
(function () {
  "use strict";
  var focused = null;

  function entries() { return document.querySelectorAll("[data-review]"); }

  document.addEventListener("focusin", function (event) {
    var item = event.target.closest && event.target.closest("[data-review]");
    if (item) { focused = item.getAttribute("data-review"); }
  });

  document.addEventListener("keydown", function (event) {
    if (event.altKey || event.ctrlKey || event.metaKey) { return; }
    var word = event.key === "a" ? "approve" : event.key === "r" ? "reject" : null;
    var active = document.activeElement;
    if (!word || !active || /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName)) { return; }
    var item = active.closest && active.closest("[data-review]");
    var button = item && item.querySelector("form[action='/" + word + "'] button");
    if (button) { event.preventDefault(); button.click(); }
  });

  function refocus() {
    var all = entries();
    if (!all.length) { return; }
    var again = focused && document.querySelector("[data-review='" + focused + "']");
    (again || all[0]).focus();
  }

  // A live update that brings the same entries would only take the focus away (and a key
  // pressed meanwhile would be lost): it is skipped.
  document.addEventListener("htmx:sseBeforeMessage", function (event) {
    var target = event.target;
    if (!target || target.id !== "reviews") { return; }
    var incoming = ((event.detail && event.detail.data) || "").match(/data-review="\d+"/g) || [];
    var current = Array.prototype.map.call(target.querySelectorAll("[data-review]"),
      function (item) { return 'data-review="' + item.getAttribute("data-review") + '"'; });
    if (incoming.join() === current.join()) { event.preventDefault(); }
  });

  window.addEventListener("load", function () {
    if (location.hash === "#review") { refocus(); }
  });
  document.addEventListener("htmx:afterSettle", function () {
    if (focused && (!document.activeElement || document.activeElement === document.body)) {
      refocus();
    }
  });
})();
