// mailgate: a "Copy" button after each element marked data-copy (the new app password,
// the settings). Progressive enhancement: without JavaScript the text is selectable as a
// whole (user-select: all), and where the clipboard is not available the button selects it.
"use strict";
document.querySelectorAll("[data-copy]").forEach(function (el) {
  var button = document.createElement("button");
  button.type = "button";
  button.className = "copy secondary";
  button.textContent = "Copy";
  button.setAttribute("aria-label", "Copy " + el.getAttribute("data-copy"));
  button.addEventListener("click", function () {
    var selection = window.getSelection();
    selection.selectAllChildren(el);
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(el.textContent.trim()).then(
        function () { button.textContent = "Copied"; },
        function () { button.textContent = "Selected: copy it"; }
      );
    } else {
      button.textContent = "Selected: copy it";
    }
  });
  el.insertAdjacentElement("afterend", button);
});
